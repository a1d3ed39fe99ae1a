/* The bench workload: call one noinline function N times.
 *   workload N FUNCTION     FUNCTION: work_emulated, work_boosted or work_c
 * Both functions are written in assembly so their first instruction is known:
 * work_emulated starts with `push rbp` (the kernel and our ptrace engine
 * emulate it), work_boosted with a `mov` (the kernel single-steps it out of
 * line, our ptrace engine runs it from a boosted slot).  With BENCH_WAIT set
 * it prints "ready ADDR" (the function's runtime address) and waits for a
 * line on stdin, so a tracer can attach first.
 *   workload N FUNCTION RATE   calls at RATE per second (in batches of 100)
 * The last line also gives when the loop started and how long it took
 * (CLOCK_MONOTONIC ns): "sum=S start_ns=T loop_ns=L". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

asm(".intel_syntax noprefix\n.text\n"
    ".globl work_emulated\n.type work_emulated,@function\nwork_emulated:\n"
    " push rbp\n mov rbp, rsp\n lea rax, [rdi+1]\n pop rbp\n ret\n"
    ".size work_emulated, .-work_emulated\n"
    ".globl work_boosted\n.type work_boosted,@function\nwork_boosted:\n"
    " mov rax, rdi\n add rax, 1\n ret\n"
    ".size work_boosted, .-work_boosted\n"
    ".att_syntax prefix\n");

long work_emulated(long), work_boosted(long);

/* The same work in C, for tools that need the compiler's help: built with
 * -fpatchable-function-entry=5 (bench/inprogram.py) it starts with the five
 * bytes of nops uftrace patches; noinline keeps it out of line. */
__attribute__((noinline)) long work_c(long x) { return x + 1; }

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: workload N work_emulated|work_boosted|work_c [RATE]\n");
        return 2;
    }
    long n = atol(argv[1]);
    long (*fn)(long) = strcmp(argv[2], "work_boosted") == 0 ? work_boosted
                       : strcmp(argv[2], "work_c") == 0 ? work_c : work_emulated;
    if (getenv("BENCH_WAIT")) {
        char line[8];
        printf("ready %p\n", (void *)fn);
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 1;
    }
    long rate = argc == 4 ? atol(argv[3]) : 0;
    long sum = 0, start = now_ns();
    if (rate > 0) {
        long period = 100 * 1000000000L / rate;
        for (long i = 0; i < n; i++) {
            if (i % 100 == 0)
                while (now_ns() < start + (i / 100) * period) {}
            sum += fn(i);
        }
    } else {
        for (long i = 0; i < n; i++)
            sum += fn(i);
    }
    printf("sum=%ld start_ns=%ld loop_ns=%ld\n", sum, start, now_ns() - start);
    return 0;
}
