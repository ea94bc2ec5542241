/* Where does C's floorf(log2f(a)) (what ggml's quantize_row_mxfp4_ref uses for its scale) differ from
 * the exact floor(log2(a)) taken from the bits? Every float32 a in [2^-125, FLT_MAX] (smaller amax is
 * passed through by mxfp4_ggml). Justifies harness.formats.ggml_floorf_log2f asking glibc only for
 * mantissa fields within 2^13 ulps of a power of two. See docs/formats.md.
 *   gcc -O2 -ffp-contract=off docs/log2f_scan.c -o /tmp/log2f_scan -lm && /tmp/log2f_scan
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

int main(void) {
    uint64_t wrong = 0, below = 0, above = 0;
    uint32_t maxdist = 0;
    for (uint32_t u = 0x01000000u; u < 0x7F800000u; u++) {
        float a;
        memcpy(&a, &u, 4);
        int exact = (int)((u >> 23) & 0xFF) - 127;
        if ((int)floorf(log2f(a)) != exact) {
            uint32_t frac = u & 0x7FFFFF;
            uint32_t dist = frac < 0x400000 ? frac : 0x800000 - frac;
            wrong++;
            if (frac < 0x400000) above++; else below++;
            if (dist > maxdist) maxdist = dist;
        }
    }
    printf("wrong %llu (just below 2^k: %llu, at/above 2^k: %llu), max distance from 2^k %u ulps\n",
           (unsigned long long)wrong, (unsigned long long)below, (unsigned long long)above, maxdist);
    return 0;
}
