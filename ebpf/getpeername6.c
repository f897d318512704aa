/* cgroup/getpeername6 on each captured pod's cgroup: getpeername4.c for dual-stack sockets,
 * whose redirected peer reads ::ffff:127.0.0.1:15001 (see connect6.c). */
#include "veil.h"

int veil_getpeername6(struct bpf_sock_addr *ctx)
{
    if (!veil_v4_mapped(ctx->user_ip6))
        return 1;
    struct veil_orig *orig = veil_peer_of(ctx, ctx->user_ip6[3]);
    if (orig) {
        ctx->user_ip6[3] = orig->ip;
        ctx->user_port = orig->port;
    }
    return 1;
}
