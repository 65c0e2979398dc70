// Stage (Conv -> BatchNorm -> ReLU) kernels: declarations and schemas.
#pragma once

// Schemas of the Stage ops, expanded inside TORCH_LIBRARY(neptune, m).
#define NEPTUNE_STAGE_SCHEMAS(m)
#define NEPTUNE_STAGE_CPU_IMPLS(m)
#define NEPTUNE_STAGE_CUDA_IMPLS(m)
