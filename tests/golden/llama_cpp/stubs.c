// The few ggml.c symbols ggml-quants.c's quantize_* paths reference.
#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>
#include "ggml.h"
size_t ggml_row_size(enum ggml_type type, int64_t ne) {
    switch (type) {
        case GGML_TYPE_Q4_0: return ne / 32 * 18;  case GGML_TYPE_Q4_1: return ne / 32 * 20;
        case GGML_TYPE_Q5_0: return ne / 32 * 22;  case GGML_TYPE_Q5_1: return ne / 32 * 24;
        case GGML_TYPE_Q8_0: return ne / 32 * 34;  case GGML_TYPE_Q2_K: return ne / 256 * 84;
        case GGML_TYPE_Q3_K: return ne / 256 * 110; case GGML_TYPE_Q4_K: return ne / 256 * 144;
        case GGML_TYPE_Q5_K: return ne / 256 * 176; case GGML_TYPE_Q6_K: return ne / 256 * 210;
        default: fprintf(stderr, "row_size: type %d\n", (int) type); abort();
    }
}
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "abort %s:%d\n", file, line); abort(); }
size_t ggml_type_size(enum ggml_type type) { (void) type; abort(); }
const char * ggml_type_name(enum ggml_type type) { (void) type; return "?"; }
