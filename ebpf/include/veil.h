/* Shared definitions of Veil's eBPF capture programs: constants and the maps every hook uses.
 *
 * bcc rewrites map calls (`veil_pods.lookup(...)`) only in the text it is given, so the agent
 * pastes this header in front of the hook files rather than letting the preprocessor include
 * it (agent/capture/ebpf.py). All hooks are one module built with -DVEIL_PIN_DIR="<dir>"; maps are
 * pinned there, so a restarted agent reopens the same maps that the programs still attached to
 * its pods are using, and the pods keep their capture without a gap.
 */
#ifndef VEIL_H
#define VEIL_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

#ifndef VEIL_PIN_DIR
#error "compile with -DVEIL_PIN_DIR=\"/sys/fs/bpf/veil\""
#endif

/* Same numbers as iptables mode (core/ports.py). */
#define VEIL_OUTBOUND_PORT 15001
#define VEIL_INBOUND_PLAIN_PORT 15006
#define VEIL_HBONE_PORT 15008
#define VEIL_AGENT_MARK 0x539
#define VEIL_CONN_MARK 0x111
#define VEIL_MARK_MASK 0xfff
#define VEIL_PROBE_SOURCE 0xa9fe077f /* 169.254.7.127, host order */
#define VEIL_LOOPBACK 0x7f000001     /* 127.0.0.1, host order */
#define VEIL_LO_IFINDEX 1
#define VEIL_SO_ORIGINAL_DST 80
#define VEIL_SOCK_STREAM 1

#define veil_htons(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define veil_ntohs(x) veil_htons(x)
#define veil_htonl(x) ((__u32)__builtin_bswap32((__u32)(x)))
#define veil_ntohl(x) veil_htonl(x)

/* bcc declares the socket cookie as 32 bits; the kernel returns 64. */
#define veil_socket_cookie(ctx) (((__u64(*)(void *))BPF_FUNC_get_socket_cookie)(ctx))
/* struct sockaddr_in, as SO_ORIGINAL_DST answers it. */
struct veil_sockaddr_in {
    __u16 family;
    __u16 port;
    __u32 addr;
    __u8 zero[8];
};

/* ::ffff:a.b.c.d: how an AF_INET6 socket names an IPv4 address; its traffic is IPv4. */
#define veil_v4_mapped(ip6) ((ip6)[0] == 0 && (ip6)[1] == 0 && (ip6)[2] == veil_htonl(0xffff))

/* Where a redirected connection was going (network byte order). */
struct veil_orig {
    __u32 ip;
    __u16 port;
    __u16 pad;
};

/* A redirected connection as the agent sees it on accept: the client's end in its netns. */
struct veil_conn_key {
    __u64 netns;
    __u32 ip;   /* network order */
    __u32 port; /* host order */
};

/* One entry per captured pod, keyed by its netns cookie (written by the agent). */
struct veil_pod {
    __u32 ip; /* network order: connections to the pod's own IP are not captured */
    __u32 flags;
};

/* Counters the agent exports as metrics. */
enum veil_counter {
    VEIL_REDIRECTED = 0, /* outbound connects sent to 15001 */
    VEIL_ORIG_SERVED,    /* SO_ORIGINAL_DST answered from the maps */
    VEIL_ORIG_MISSING,   /* SO_ORIGINAL_DST asked for a connection we did not record */
    VEIL_STEERED,        /* inbound SYNs assigned to the 15006 listener */
    VEIL_NO_LISTENER,    /* inbound SYNs dropped: no 15006 listener (agent down) */
    VEIL_REPLIES_LOCAL,  /* app replies to spoofed connections delivered to the agent */
    VEIL_ASSIGN_FAILED,  /* inbound SYNs dropped: the listener was found, assignment failed */
    VEIL_COUNTERS,
};

BPF_TABLE_PINNED("lru_hash", __u64, struct veil_orig, veil_sock_orig, 65536,
                 VEIL_PIN_DIR "/sock_orig");
BPF_TABLE_PINNED("lru_hash", struct veil_conn_key, struct veil_orig, veil_conn_orig, 65536,
                 VEIL_PIN_DIR "/conn_orig");
BPF_TABLE_PINNED("hash", __u64, struct veil_pod, veil_pods, 16384, VEIL_PIN_DIR "/pods");
BPF_TABLE_PINNED("array", __u32, __u64, veil_counters, VEIL_COUNTERS, VEIL_PIN_DIR "/counters");

/* The TCP header of an IPv4 packet at the start of a tc program's buffer (Ethernet first),
 * with `*ip` set; NULL for anything else or a packet too short to hold both headers. */
static __always_inline struct tcphdr *veil_tcp(struct __sk_buff *skb, struct iphdr **ip)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != veil_htons(ETH_P_IP))
        return NULL;
    struct iphdr *iph = (void *)(eth + 1);
    if ((void *)(iph + 1) > end || iph->protocol != IPPROTO_TCP || iph->ihl < 5)
        return NULL;
    struct tcphdr *tcp = (void *)iph + iph->ihl * 4;
    if ((void *)(tcp + 1) > end)
        return NULL;
    *ip = iph;
    return tcp;
}

/* An IPv6 packet that carries TCP (right after the fixed header; Ethernet first). */
static __always_inline int veil_ipv6_tcp(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != veil_htons(ETH_P_IPV6))
        return 0;
    __u8 *next_header = (__u8 *)(eth + 1) + 6; /* ipv6hdr.nexthdr */
    if ((void *)(next_header + 1) > end)
        return 0;
    return *next_header == IPPROTO_TCP;
}

static __always_inline void veil_count(__u32 which)
{
    __u64 *v = veil_counters.lookup(&which);
    if (v)
        __sync_fetch_and_add(v, 1);
}

/* The decision and bookkeeping of an outbound connect to IPv4 `dst` (network order), shared
 * by connect4.c and connect6.c: 0 if it stays direct; otherwise the original destination is
 * recorded by socket cookie and the caller rewrites the destination to 127.0.0.1:15001. */
static __always_inline int veil_outbound(struct bpf_sock_addr *ctx, __u32 dst)
{
    if (ctx->type != VEIL_SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
        return 0;
    __u32 dst_host = veil_ntohl(dst);
    if ((dst_host >> 24) == 127 || dst_host == VEIL_PROBE_SOURCE)
        return 0; /* loopback and the kubelet's probe address stay direct */
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct veil_pod *pod = veil_pods.lookup(&netns);
    if (pod && pod->ip == dst)
        return 0; /* the pod calling itself never leaves the netns */
    struct veil_orig orig = {.ip = dst, .port = (__u16)ctx->user_port};
    __u64 cookie = veil_socket_cookie(ctx);
    veil_sock_orig.update(&cookie, &orig);
    veil_count(VEIL_REDIRECTED);
    return 1;
}

#endif /* VEIL_H */
