// Golden-vector harness: runs llama.cpp's own quantize_<type>() (ggml-quants.c) on float32 rows.
// usage: harness TYPE ROWS COLS IN.f32 OUT.bin [IMATRIX.f32]
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include "ggml.h"
#include "ggml-quants.h"

typedef size_t (*qfn)(const float *, void *, int64_t, int64_t, const float *);
static struct { const char * name; qfn fn; int bs; int ts; } T[] = {
    {"q4_0", quantize_q4_0, 32, 18}, {"q4_1", quantize_q4_1, 32, 20}, {"q5_0", quantize_q5_0, 32, 22},
    {"q5_1", quantize_q5_1, 32, 24}, {"q8_0", quantize_q8_0, 32, 34}, {"q2_k", quantize_q2_K, 256, 84},
    {"q3_k", quantize_q3_K, 256, 110}, {"q4_k", quantize_q4_K, 256, 144}, {"q5_k", quantize_q5_K, 256, 176},
    {"q6_k", quantize_q6_K, 256, 210},
};
static float * readf(const char * p, size_t n) {
    float * b = malloc(n * 4); FILE * f = fopen(p, "rb");
    if (!f || fread(b, 4, n, f) != n) { fprintf(stderr, "read %s\n", p); exit(1); }
    fclose(f); return b;
}
int main(int argc, char ** argv) {
    if (argc < 6) return 2;
    int64_t rows = atoll(argv[2]), cols = atoll(argv[3]);
    for (size_t i = 0; i < sizeof(T)/sizeof(T[0]); i++) {
        if (strcmp(T[i].name, argv[1])) continue;
        float * x = readf(argv[4], rows * cols);
        float * im = argc > 6 ? readf(argv[6], cols) : NULL;
        size_t nbytes = rows * (cols / T[i].bs) * T[i].ts;
        void * out = calloc(nbytes, 1);
        size_t got = T[i].fn(x, out, rows, cols, im);
        if (got != nbytes) { fprintf(stderr, "size %zu != %zu\n", got, nbytes); return 1; }
        FILE * f = fopen(argv[5], "wb"); fwrite(out, 1, nbytes, f); fclose(f);
        return 0;
    }
    fprintf(stderr, "unknown type %s\n", argv[1]); return 1;
}
