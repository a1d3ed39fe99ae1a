/* The bundled example that `uprobes demo` compiles and traces: a tiny
 * "key-value store" whose functions take integers, strings and structs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct entry { const char *key; long value; };

static struct entry table[8];
static int used;

__attribute__((noinline)) long kv_put(const char *key, long value) {
    for (int i = 0; i < used; i++)
        if (strcmp(table[i].key, key) == 0)
            return table[i].value = value;
    table[used].key = key;
    table[used].value = value;
    used++;
    return value;
}

__attribute__((noinline)) long kv_get(const char *key) {
    for (int i = 0; i < used; i++)
        if (strcmp(table[i].key, key) == 0)
            return table[i].value;
    return -1;
}

int main(void) {
    const char *keys[] = { "alpha", "beta", "gamma" };
    long sum = 0;
    for (int i = 0; i < 3; i++)
        kv_put(keys[i], (i + 1) * 10);
    for (int i = 0; i < 3; i++)
        sum += kv_get(keys[i]);
    sum += kv_get("delta");
    printf("sum=%ld\n", sum);
    return 0;
}
