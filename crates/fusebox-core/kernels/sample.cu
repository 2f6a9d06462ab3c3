// sample.cu
#include "common.cuh"
