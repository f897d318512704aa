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
    if (ctx->type != VEIL_SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
        return 1;
    __u32 dst = ctx->user_ip4;
    __u32 dst_host = veil_ntohl(dst);
    if ((dst_host >> 24) == 127 || dst_host == VEIL_PROBE_SOURCE)
        return 1; /* loopback and the kubelet's probe address stay direct */
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct veil_pod *pod = veil_pods.lookup(&netns);
    if (pod && pod->ip == dst)
        return 1; /* the pod calling itself never leaves the netns */
    struct veil_orig orig = {.ip = dst, .port = (__u16)ctx->user_port};
    __u64 cookie = veil_socket_cookie(ctx);
    veil_sock_orig.update(&cookie, &orig);
    if (pod) {
        /* Port 0: the port is picked at connect, by the 4-tuple (IP_BIND_ADDRESS_NO_PORT).
         * A socket the app bound itself refuses (EINVAL) and keeps its own address. */
        struct veil_sockaddr_in src = {.family = 2 /* AF_INET */, .addr = pod->ip};
        veil_bind(ctx, &src, sizeof(src));
    }
    ctx->user_ip4 = veil_htonl(VEIL_LOOPBACK);
    ctx->user_port = veil_htons(VEIL_OUTBOUND_PORT);
    veil_count(VEIL_REDIRECTED);
    return 1;
}
