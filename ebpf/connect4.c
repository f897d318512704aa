/* cgroup/connect4 on each captured pod's cgroup: send the pod's outbound TCP connects to the
 * agent's 15001 listener in the pod netns and remember where they were going (by socket cookie;
 * sockops.c re-keys it once the source port is known). What iptables mode's nat OUTPUT REDIRECT
 * does, without netfilter or conntrack. The agent's own sockets live in the agent's cgroup, so
 * they never reach this hook.
 *
 * The socket is bound to the pod's IP first: left alone, a connect to 127.0.0.1 would take
 * 127.0.0.1 as its source, and the app would see itself as 127.0.0.1 (getsockname) and the
 * agent would see the client as 127.0.0.1 (its access log, the `forwarded` header). With
 * iptables REDIRECT the source is chosen for the original destination: the pod's IP. What the
 * app reads back as its peer (getpeername) is answered by getpeername4.c.
 */
#include "veil.h"

int veil_connect4(struct bpf_sock_addr *ctx)
{
    __u32 pod_ip = 0;
    if (!veil_outbound(ctx, ctx->user_ip4, &pod_ip))
        return 1;
    if (pod_ip) {
        /* Port 0: the port is picked at connect, by the 4-tuple (IP_BIND_ADDRESS_NO_PORT).
         * A socket the app bound itself refuses (EINVAL) and keeps its own address. */
        struct veil_sockaddr_in src = {.family = 2 /* AF_INET */, .addr = pod_ip};
        veil_bind(ctx, &src, sizeof(src));
    }
    ctx->user_ip4 = veil_htonl(VEIL_LOOPBACK);
    ctx->user_port = veil_htons(VEIL_OUTBOUND_PORT);
    return 1;
}
