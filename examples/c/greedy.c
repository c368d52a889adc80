/* greedy MODEL_DIR PROMPT N: prints the first N greedy token ids that follow PROMPT (a BOS token is
 * added), separated by spaces, on one line; fewer if the model ends the text first. Uses the C ABI
 * of libmixtral (include/mixtral.h); built by scripts/build-c-example. Errors: one line on stderr,
 * exit status 1 (2 for usage). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "mixtral.h"

struct printer {
    size_t count;
};

/* Prints each id as it is generated. */
static int print_token(void *user_data, uint32_t token, const char *text, size_t text_len) {
    struct printer *p = user_data;
    (void)text;
    (void)text_len;
    printf(p->count == 0 ? "%u" : " %u", (unsigned)token);
    p->count++;
    return 0; /* continue */
}

static int fail(const char *what, MixtralStatus status) {
    fprintf(stderr, "error: %s: %s: %s\n", what, mixtral_status_name((int32_t)status),
            mixtral_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL_DIR PROMPT N\n", argv[0]);
        return 2;
    }
    char *end = NULL;
    errno = 0;
    unsigned long long n = strtoull(argv[3], &end, 10);
    if (errno != 0 || end == argv[3] || *end != '\0' || argv[3][0] == '-') {
        fprintf(stderr, "error: N must be a non-negative integer, got \"%s\"\n", argv[3]);
        return 2;
    }

    MixtralModel *model = NULL;
    MixtralEngine *engine = NULL;
    MixtralRequest *request = NULL;
    int rc = 0;
    MixtralStatus status = mixtral_model_load(argv[1], &model);
    if (status != MIXTRAL_STATUS_OK) {
        rc = fail("loading the model", status);
        goto done;
    }
    status = mixtral_engine_new(model, "cpu", 0, &engine);
    if (status != MIXTRAL_STATUS_OK) {
        rc = fail("building the engine", status);
        goto done;
    }
    status = mixtral_request_new(model, argv[2], (size_t)n, &request);
    if (status != MIXTRAL_STATUS_OK) {
        rc = fail("encoding the prompt", status);
        goto done;
    }
    struct printer printer = {0};
    status = mixtral_generate(engine, request, print_token, &printer);
    printf("\n");
    if (status != MIXTRAL_STATUS_OK) {
        rc = fail("generating", status);
        goto done;
    }

done:
    mixtral_request_free(request);
    mixtral_engine_free(engine);
    mixtral_model_free(model);
    return rc;
}
