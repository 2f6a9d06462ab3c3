// moe.cu
#include "common.cuh"
