/* sockops on each captured pod's cgroup: when a redirected connect sends its SYN, the source
 * port is known; re-key the original destination by (netns, source address, source port), which
 * is what the agent sees as the peer of the accepted connection. The entry by socket cookie
 * stays for getpeername4.c (the LRU map drops it once the socket is long gone).
 */
#include "veil.h"

int veil_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB || skops->family != 2 /* AF_INET */)
        return 1;
    __u64 cookie = veil_socket_cookie(skops);
    struct veil_orig *found = veil_sock_orig.lookup(&cookie);
    if (!found)
        return 1;
    struct veil_orig orig = *found;
    struct veil_conn_key key = {
        .netns = bpf_get_netns_cookie(skops),
        .ip = skops->local_ip4,
        .port = skops->local_port,
    };
    veil_conn_orig.update(&key, &orig);
    return 1;
}
