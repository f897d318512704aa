/* cgroup/getpeername4, getpeername6, getsockname4, getsockname6 on each captured pod's cgroup:
 * what the app reads back about a connection connect4.c/connect6.c redirected is what it would
 * see with iptables mode's NAT, which is invisible to it: its peer is where it was going, not
 * the agent's 127.0.0.1:15001, and its own address is the pod's IP, not 127.0.0.1.
 *
 * The socket really is bound to 127.0.0.1 (a connect to 127.0.0.1 picks that source): binding
 * it to the pod's IP instead (bpf_bind) was tried and left out. The agent's end of the
 * connection would then be (127.0.0.1:15001, pod IP:port), the same 4-tuple as iptables mode
 * makes, but with another TCP timestamp offset (Linux derives it from the address pair); for a
 * minute after switching capture modes, new connections met the other mode's TIME_WAIT sockets,
 * were refused by PAWS and retried their SYN a second later.
 */
#include "veil.h"

/* The original destination connect4.c/connect6.c recorded for this socket; 0: not redirected. */
static __always_inline struct veil_orig *veil_redirected(struct bpf_sock_addr *ctx)
{
    __u64 cookie = veil_socket_cookie(ctx);
    return veil_sock_orig.lookup(&cookie);
}

static __always_inline __u32 veil_pod_ip(struct bpf_sock_addr *ctx)
{
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct veil_pod *pod = veil_pods.lookup(&netns);
    return pod ? pod->ip : 0;
}

int veil_getpeername4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 != veil_htonl(VEIL_LOOPBACK) ||
        ctx->user_port != veil_htons(VEIL_OUTBOUND_PORT))
        return 1;
    struct veil_orig *orig = veil_redirected(ctx);
    if (orig) {
        ctx->user_ip4 = orig->ip;
        ctx->user_port = orig->port;
    }
    return 1;
}

int veil_getpeername6(struct bpf_sock_addr *ctx)
{
    if (!veil_v4_mapped(ctx->user_ip6) || ctx->user_ip6[3] != veil_htonl(VEIL_LOOPBACK) ||
        ctx->user_port != veil_htons(VEIL_OUTBOUND_PORT))
        return 1;
    struct veil_orig *orig = veil_redirected(ctx);
    if (orig) {
        ctx->user_ip6[3] = orig->ip;
        ctx->user_port = orig->port;
    }
    return 1;
}

int veil_getsockname4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 != veil_htonl(VEIL_LOOPBACK) || !veil_redirected(ctx))
        return 1;
    __u32 ip = veil_pod_ip(ctx);
    if (ip)
        ctx->user_ip4 = ip;
    return 1;
}

int veil_getsockname6(struct bpf_sock_addr *ctx)
{
    if (!veil_v4_mapped(ctx->user_ip6) || ctx->user_ip6[3] != veil_htonl(VEIL_LOOPBACK) ||
        !veil_redirected(ctx))
        return 1;
    __u32 ip = veil_pod_ip(ctx);
    if (ip)
        ctx->user_ip6[3] = ip;
    return 1;
}
