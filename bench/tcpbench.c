/* tcpbench: a small C load generator for the data-path benchmark (no Python on the ends).
 *
 *   tcpbench server PORT                       the first byte of a connection picks its
 *                                              mode: S, R or C; C connections are served by
 *                                              a fixed set of accepting threads, S and R by a
 *                                              thread each (they live long)
 *   tcpbench stream HOST PORT SECONDS          send 256 KiB writes; prints bytes/s
 *   tcpbench rr     HOST PORT SECONDS          64-byte ping-pong on one connection;
 *                                              prints round trips, p50 and p99 in us
 *   tcpbench crr    HOST PORT SECONDS CLIENTS  connect, 1 byte each way, close, repeat;
 *                                              prints connections/s over CLIENTS threads
 *
 * Every client prints one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)
#define MSG 64
#define MAX_SAMPLES 4000000

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int read_full(int fd, char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const char *buf, size_t n) {
    size_t sent = 0;
    while (sent < n) {
        ssize_t w = write(fd, buf + sent, n - sent);
        if (w <= 0) return -1;
        sent += (size_t)w;
    }
    return 0;
}

static int dial(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* A long-lived connection (stream or ping-pong), on a thread of its own. */
struct long_conn { int fd; char mode; };

static void *serve_long(void *arg) {
    struct long_conn *lc = arg;
    int fd = lc->fd;
    char mode = lc->mode;
    free(lc);
    char *buf = malloc(CHUNK);
    if (mode == 'S') {
        while (read(fd, buf, CHUNK) > 0) {}
    } else if (mode == 'R') {
        while (read_full(fd, buf, MSG) == 0 && write_full(fd, buf, MSG) == 0) {}
    }
    free(buf);
    close(fd);
    return NULL;
}

/* Accepting threads, all blocked in accept() on the one listener (the kernel wakes one per
 * connection). A C connection is answered on the spot: a thread created per connection, as
 * the first version did, cost the machine a clone, a stack and a 256 KiB buffer for each, CPU
 * taken from whatever path was being measured (a real server keeps its workers). */
#define ACCEPTORS 8

static void *acceptor(void *arg) {
    int lfd = (int)(intptr_t)arg;
    for (;;) {
        int c = accept(lfd, NULL, NULL);  /* accepted sockets inherit TCP_NODELAY */
        if (c < 0) continue;
        char mode;
        if (read_full(c, &mode, 1) != 0) {
            close(c);
        } else if (mode == 'C') {
            write_full(c, "c", 1);
            close(c);
        } else if (mode == 'S' || mode == 'R') {
            struct long_conn *lc = malloc(sizeof *lc);
            pthread_t t;
            pthread_attr_t attr;
            lc->fd = c;
            lc->mode = mode;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            if (pthread_create(&t, &attr, serve_long, lc) != 0) {
                free(lc);
                close(c);
            }
            pthread_attr_destroy(&attr);
        } else {
            close(c);
        }
    }
    return NULL;
}

static int server(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 4096) != 0) {
        perror("tcpbench server");
        return 1;
    }
    fprintf(stderr, "tcpbench: listening on %d\n", port);
    pthread_t t[ACCEPTORS];
    for (int i = 0; i < ACCEPTORS; i++)
        pthread_create(&t[i], NULL, acceptor, (void *)(intptr_t)fd);
    for (int i = 0; i < ACCEPTORS; i++) pthread_join(t[i], NULL);
    return 0;
}

static int stream(const char *host, int port, double seconds) {
    int fd = dial(host, port);
    if (fd < 0) { perror("connect"); return 1; }
    char *buf = calloc(1, CHUNK);
    write_full(fd, "S", 1);
    double start = now(), end = start + seconds;
    uint64_t sent = 0;
    while (now() < end) {
        if (write_full(fd, buf, CHUNK) != 0) { perror("write"); return 1; }
        sent += CHUNK;
    }
    shutdown(fd, SHUT_WR);
    while (read(fd, buf, CHUNK) > 0) {}  /* until the far end has it all and closes */
    double took = now() - start;
    printf("{\"bytes\": %llu, \"seconds\": %.3f, \"bytes_per_s\": %.0f}\n",
           (unsigned long long)sent, took, sent / took);
    return 0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int rr(const char *host, int port, double seconds) {
    int fd = dial(host, port);
    if (fd < 0) { perror("connect"); return 1; }
    char msg[MSG] = {0};
    double *lat = malloc(sizeof(double) * MAX_SAMPLES);
    size_t n = 0;
    write_full(fd, "R", 1);
    for (int i = 0; i < 200; i++) {  /* warm up: tunnel set up, caches hot */
        if (write_full(fd, msg, MSG) || read_full(fd, msg, MSG)) { perror("rr"); return 1; }
    }
    double end = now() + seconds;
    while (n < MAX_SAMPLES) {
        double t0 = now();
        if (t0 >= end) break;
        if (write_full(fd, msg, MSG) || read_full(fd, msg, MSG)) { perror("rr"); return 1; }
        lat[n++] = (now() - t0) * 1e6;
    }
    qsort(lat, n, sizeof(double), cmp);
    printf("{\"round_trips\": %zu, \"p50_us\": %.1f, \"p99_us\": %.1f}\n", n, lat[n / 2],
           lat[(size_t)(n * 0.99)]);
    close(fd);
    return 0;
}

struct crr_arg { const char *host; int port; double end; uint64_t done; uint64_t failed; };

static void *crr_loop(void *p) {
    struct crr_arg *a = p;
    char b;
    while (now() < a->end) {
        int fd = dial(a->host, a->port);
        if (fd < 0) { a->failed++; continue; }
        if (write_full(fd, "C", 1) == 0 && read_full(fd, &b, 1) == 0) a->done++;
        else a->failed++;
        close(fd);
    }
    return NULL;
}

static int crr(const char *host, int port, double seconds, int clients) {
    pthread_t t[64];
    struct crr_arg args[64];
    if (clients < 1 || clients > 64) clients = 4;
    double start = now();
    for (int i = 0; i < clients; i++) {
        args[i] = (struct crr_arg){host, port, start + seconds, 0, 0};
        pthread_create(&t[i], NULL, crr_loop, &args[i]);
    }
    uint64_t done = 0, failed = 0;
    for (int i = 0; i < clients; i++) {
        pthread_join(t[i], NULL);
        done += args[i].done;
        failed += args[i].failed;
    }
    double took = now() - start;
    printf("{\"connections\": %llu, \"failed\": %llu, \"conn_per_s\": %.0f}\n",
           (unsigned long long)done, (unsigned long long)failed, done / took);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "server")) return server(atoi(argv[2]));
    if (argc >= 5 && !strcmp(argv[1], "stream")) return stream(argv[2], atoi(argv[3]), atof(argv[4]));
    if (argc >= 5 && !strcmp(argv[1], "rr")) return rr(argv[2], atoi(argv[3]), atof(argv[4]));
    if (argc >= 6 && !strcmp(argv[1], "crr"))
        return crr(argv[2], atoi(argv[3]), atof(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: tcpbench server PORT | stream|rr HOST PORT SECONDS | "
                    "crr HOST PORT SECONDS CLIENTS\n");
    return 2;
}
