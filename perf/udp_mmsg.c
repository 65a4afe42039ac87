/*
 * Small-packet UDP sender and sink for perf/bench_live.py, batching with
 * sendmmsg(2) and recvmmsg(2) so that the tool itself is not the bottleneck.
 *
 *   udp_mmsg send DST_IP PORT SECONDS PAYLOAD_BYTES
 *   udp_mmsg recv BIND_IP PORT WARMUP_SECONDS SECONDS
 *
 * The sender sends datagrams of PAYLOAD_BYTES to DST_IP:PORT as fast as it
 * can for SECONDS and prints one JSON line: datagrams sent and send errors.
 *
 * The sink prints "ready" once its socket is bound, then waits (at most
 * 10 s) for the first datagram. It skips WARMUP_SECONDS after that datagram
 * and counts what arrives in the next SECONDS. It then prints one JSON line:
 * datagrams and bytes counted, the length of the window in seconds, and
 * `total`, all datagrams received from the first one to the window's end.
 * Exit status 0 on success, 1 when no datagram arrived, 2 on a usage or
 * socket error.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_PAYLOAD 1472
#define FIRST_DATAGRAM_TIMEOUT 10.0

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int parse_address(const char *ip, const char *port, struct sockaddr_in *out)
{
    memset(out, 0, sizeof(*out));
    out->sin_family = AF_INET;
    out->sin_port = htons((unsigned short)atoi(port));
    if (inet_pton(AF_INET, ip, &out->sin_addr) != 1) {
        fprintf(stderr, "udp_mmsg: invalid IPv4 address %s\n", ip);
        return -1;
    }
    return 0;
}

static int run_sender(const char *ip, const char *port, double seconds, int payload)
{
    struct sockaddr_in destination;
    if (parse_address(ip, port, &destination) < 0)
        return 2;
    if (payload < 0 || payload > MAX_PAYLOAD) {
        fprintf(stderr, "udp_mmsg: payload must be 0..%d bytes, not %d\n", MAX_PAYLOAD, payload);
        return 2;
    }
    int sock = socket(AF_INET, SOCK_DGRAM, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&destination, sizeof(destination)) < 0) {
        perror("udp_mmsg: socket or connect");
        return 2;
    }

    static char data[MAX_PAYLOAD];
    memset(data, 'x', sizeof(data));
    struct iovec iov[BATCH];
    struct mmsghdr messages[BATCH];
    memset(messages, 0, sizeof(messages));
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = data;
        iov[i].iov_len = payload;
        messages[i].msg_hdr.msg_iov = &iov[i];
        messages[i].msg_hdr.msg_iovlen = 1;
    }

    long long sent = 0, errors = 0;
    double deadline = now() + seconds;
    while (now() < deadline) {
        int n = sendmmsg(sock, messages, BATCH, 0);
        if (n < 0) {
            /* ENOBUFS or ECONNREFUSED (an ICMP error from the sink's side): count and go on. */
            errors++;
            continue;
        }
        sent += n;
    }
    printf("{\"sent\": %lld, \"errors\": %lld, \"seconds\": %.3f}\n", sent, errors, seconds);
    close(sock);
    return 0;
}

static int run_sink(const char *ip, const char *port, double warmup, double seconds)
{
    struct sockaddr_in local;
    if (parse_address(ip, port, &local) < 0)
        return 2;
    int sock = socket(AF_INET, SOCK_DGRAM, 0);
    if (sock < 0 || bind(sock, (struct sockaddr *)&local, sizeof(local)) < 0) {
        perror("udp_mmsg: socket or bind");
        return 2;
    }
    int rcvbuf = 8 << 20;
    /* SO_RCVBUFFORCE passes the rmem_max cap when run as root; otherwise the capped size applies. */
    if (setsockopt(sock, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)) < 0)
        setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    struct timeval poll_interval = {.tv_sec = 0, .tv_usec = 100000};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &poll_interval, sizeof(poll_interval));
    printf("ready\n");
    fflush(stdout);

    static char buffers[BATCH][2048];
    struct iovec iov[BATCH];
    struct mmsghdr messages[BATCH];
    memset(messages, 0, sizeof(messages));
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = buffers[i];
        iov[i].iov_len = sizeof(buffers[i]);
        messages[i].msg_hdr.msg_iov = &iov[i];
        messages[i].msg_hdr.msg_iovlen = 1;
    }

    double started = now(), window_start = 0, window_end = 0;
    long long packets = 0, bytes = 0, total = 0;
    int seen_first = 0;
    for (;;) {
        double t = now();
        if (!seen_first && t - started > FIRST_DATAGRAM_TIMEOUT)
            break;
        if (seen_first && t >= window_end)
            break;
        int n = recvmmsg(sock, messages, BATCH, 0, NULL);
        if (n <= 0)
            continue; /* SO_RCVTIMEO expired: check the clock again */
        t = now();
        if (!seen_first) {
            seen_first = 1;
            window_start = t + warmup;
            window_end = window_start + seconds;
        }
        if (t < window_end)
            total += n;
        if (t < window_start || t >= window_end)
            continue;
        packets += n;
        for (int i = 0; i < n; i++)
            bytes += messages[i].msg_len;
    }
    if (!seen_first) {
        printf("{\"packets\": 0, \"bytes\": 0, \"seconds\": 0, \"total\": 0}\n");
        close(sock);
        return 1;
    }
    printf("{\"packets\": %lld, \"bytes\": %lld, \"seconds\": %.3f, \"total\": %lld}\n", packets, bytes, seconds, total);
    close(sock);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && strcmp(argv[1], "send") == 0)
        return run_sender(argv[2], argv[3], atof(argv[4]), atoi(argv[5]));
    if (argc == 6 && strcmp(argv[1], "recv") == 0)
        return run_sink(argv[2], argv[3], atof(argv[4]), atof(argv[5]));
    fprintf(stderr,
            "usage: udp_mmsg send DST_IP PORT SECONDS PAYLOAD_BYTES\n"
            "       udp_mmsg recv BIND_IP PORT WARMUP_SECONDS SECONDS\n");
    return 2;
}
