// zo2/core/platform.hpp -- macros that let one function serve host and device code.
#pragma once

#if defined(__CUDACC__)
#define ZO2_HD __host__ __device__
#define ZO2_FORCEINLINE __forceinline__
#else
#define ZO2_HD
#define ZO2_FORCEINLINE inline __attribute__((always_inline))
#endif
