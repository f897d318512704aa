/* cgroup/connect4 on each captured pod's cgroup: send the pod's outbound TCP connects to the
 * agent's 15001 listener in the pod netns and remember where they were going (by socket cookie;
 * sockops.c re-keys it once the source port is known). What iptables mode's nat OUTPUT REDIRECT
 * does, without netfilter or conntrack. The agent's own sockets live in the agent's cgroup, so
 * they never reach this hook. What the app reads back (its peer, its own address) is answered
 * by names.c.
 */
#include "veil.h"

int veil_connect4(struct bpf_sock_addr *ctx)
{
    if (!veil_outbound(ctx, ctx->user_ip4))
        return 1;
    ctx->user_ip4 = veil_htonl(VEIL_LOOPBACK);
    ctx->user_port = veil_htons(VEIL_OUTBOUND_PORT);
    return 1;
}
