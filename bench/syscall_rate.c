/* System calls at a steady rate, for bench/kernel_events.py: RATE getppid()
 * calls a second for SECONDS, paced every 500 calls by CLOCK_MONOTONIC
 * (read in the vDSO: no system call of its own), between mark(1) and
 * mark(2). Prints how many it made. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) void mark(int n) { __asm__ volatile("" : : "r"(n) : "memory"); }

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    long rate = argc > 1 ? atol(argv[1]) : 50000;
    double seconds = argc > 2 ? atof(argv[2]) : 2.0;
    long total = (long)(rate * seconds), made = 0;
    long long start = now_ns();
    mark(1);
    while (made < total) {
        for (int i = 0; i < 500 && made < total; i++, made++)
            syscall(SYS_getppid);
        long long due = start + made * 1000000000LL / rate;
        while (now_ns() < due)
            ;
    }
    mark(2);
    double took = (now_ns() - start) / 1e9;
    printf("syscalls=%ld seconds=%.3f rate=%.0f\n", made, took, made / took);
    return 0;
}
