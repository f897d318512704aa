/* sockops on each captured pod's cgroup: when a redirected connect sends its SYN, the source
 * port is known; re-key the original destination by (netns, source address, source port), which
 * is what the agent sees as the peer of the accepted connection. The entry by socket cookie
 * stays for names.c (the LRU map drops it once the socket is long gone).
 * A dual-stack socket's IPv4 connection (connect6.c) has a v4-mapped local address.
 */
#include "veil.h"

int veil_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
        return 1;
    /* Volatile reads, each at its own fixed offset: the verifier refuses a context read
     * through a computed pointer, which is how clang may compile a choice between fields. */
    __u32 family = skops->family;
    __u32 ip6[4] = {
        *(volatile __u32 *)&skops->local_ip6[0],
        *(volatile __u32 *)&skops->local_ip6[1],
        *(volatile __u32 *)&skops->local_ip6[2],
        *(volatile __u32 *)&skops->local_ip6[3],
    };
    __u32 local_ip = *(volatile __u32 *)&skops->local_ip4;
    if (family == 10 /* AF_INET6 */ && veil_v4_mapped(ip6))
        local_ip = ip6[3];
    else if (family != 2 /* AF_INET */)
        return 1;
    __u64 cookie = veil_socket_cookie(skops);
    struct veil_orig *found = veil_sock_orig.lookup(&cookie);
    if (!found)
        return 1;
    struct veil_orig orig = *found;
    struct veil_conn_key key = {
        .netns = bpf_get_netns_cookie(skops),
        .ip = local_ip,
        .port = skops->local_port,
    };
    veil_conn_orig.update(&key, &orig);
    return 1;
}
