/* cgroup/getpeername4 on each captured pod's cgroup: a redirected connection's peer, as the
 * app reads it back, is where it was going, not the agent's 127.0.0.1:15001 (iptables mode's NAT
 * is invisible to getpeername; connect4.c's rewrite is not). Answered from the original
 * destination connect4.c recorded by socket cookie.
 */
#include "veil.h"

int veil_getpeername4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 != veil_htonl(VEIL_LOOPBACK) ||
        ctx->user_port != veil_htons(VEIL_OUTBOUND_PORT))
        return 1;
    __u64 cookie = veil_socket_cookie(ctx);
    struct veil_orig *orig = veil_sock_orig.lookup(&cookie);
    if (!orig)
        return 1;
    ctx->user_ip4 = orig->ip;
    ctx->user_port = orig->port;
    return 1;
}
