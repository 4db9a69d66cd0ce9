// GSLORA_INLINE: force inlining of a CPU helper. The kernels are compiled several times for
// different targets (target_clones, #pragma GCC target); a helper left out of line is compiled
// once for the default target, and every clone would call that SSE-only copy.
#pragma once

#define GSLORA_INLINE inline __attribute__((always_inline))
// The same for a lambda (the attribute goes after the parameter list).
#define GSLORA_INLINE_LAMBDA __attribute__((always_inline))
