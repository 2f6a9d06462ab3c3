// gemv.cu
#include "common.cuh"
