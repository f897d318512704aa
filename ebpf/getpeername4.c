/* cgroup/getpeername4 on each captured pod's cgroup: a redirected connection's peer, as the
 * app reads it back, is where it was going, not the agent's 127.0.0.1:15001 (iptables mode's NAT
 * is invisible to getpeername; connect4.c's rewrite is not). Answered from the original
 * destination connect4.c recorded by socket cookie.
 */
#include "veil.h"

int veil_getpeername4(struct bpf_sock_addr *ctx)
{
    struct veil_orig *orig = veil_peer_of(ctx, ctx->user_ip4);
    if (orig) {
        ctx->user_ip4 = orig->ip;
        ctx->user_port = orig->port;
    }
    return 1;
}
