// veil-cni: the chained CNI plugin the container runtime executes on the node.
//
// Self-contained (static, no Python on the host): it forwards the whole CNI request (the
// CNI_* environment and the network configuration on stdin) to the node's Veil agent over a
// Unix socket and prints the agent's answer with the agent's exit code. The agent keeps the
// logic (agent/cni/plugin.py). Wire format, agent side in agent/cni/server.py:
//
//   request:  "CNI/1\n" "KEY=VALUE\n"... "\n" <stdin bytes>      (then shutdown for writing)
//   answer:   "<exit code>\n" <stdout bytes>                        (then the agent closes)
//
// Only what must work without the agent is decided here, and it fails closed:
//   VERSION                          answered here (a runtime may ask before the agent runs)
//   DEL                              succeeds (CNI wants DEL idempotent; nothing of ours left)
//   a pod of `excludeNamespaces`     passes through: ADD prints prevResult, CHECK succeeds
//   anything else                    error 11 "try again later": the pod never starts uncaptured
//
// The socket is `agentSocket` in the configuration (default /var/run/veil/cni.sock).

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_INPUT (1 << 20)
#define MAX_ANSWER (1 << 20)
#define AGENT_TIMEOUT 25 // seconds: the agent answers ADD once capture is in place (<= 20 s)
#define DEFAULT_SOCKET "/var/run/veil/cni.sock"
#define SUPPORTED "[\"0.4.0\",\"1.0.0\"]"

static const char *FORWARDED[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
                                  "CNI_IFNAME",  "CNI_ARGS",        "CNI_PATH"};

// -- a minimal JSON reader: enough to find top-level members and read plain strings ---------

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

// The end of the JSON value starting at p (NULL if malformed or truncated).
static const char *skip_value(const char *p, const char *end, int depth) {
    p = skip_ws(p, end);
    if (p >= end || depth > 64)
        return NULL;
    if (*p == '"') {
        for (p++; p < end; p++) {
            if (*p == '\\')
                p++;
            else if (*p == '"')
                return p + 1;
        }
        return NULL;
    }
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        p = skip_ws(p + 1, end);
        if (p < end && *p == close)
            return p + 1;
        while (p < end) {
            if (close == '}') {
                p = skip_value(p, end, depth + 1); // the key
                if (!p)
                    return NULL;
                p = skip_ws(p, end);
                if (p >= end || *p != ':')
                    return NULL;
                p++;
            }
            p = skip_value(p, end, depth + 1);
            if (!p)
                return NULL;
            p = skip_ws(p, end);
            if (p < end && *p == ',') {
                p = skip_ws(p + 1, end);
                continue;
            }
            if (p < end && *p == close)
                return p + 1;
            return NULL;
        }
        return NULL;
    }
    while (p < end && (strchr("-+.eE", *p) || (*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z')))
        p++;
    return p;
}

// Copy the JSON string at p (no escapes other than \" \\ \/) into out; 0 on success.
static int read_string(const char *p, const char *end, char *out, size_t size) {
    size_t n = 0;
    if (p >= end || *p != '"')
        return -1;
    for (p++; p < end && *p != '"'; p++) {
        if (*p == '\\') {
            if (++p >= end || !strchr("\"\\/", *p))
                return -1; // a socket path or namespace name never needs more
        }
        if (n + 1 >= size)
            return -1;
        out[n++] = *p;
    }
    if (p >= end)
        return -1;
    out[n] = 0;
    return 0;
}

// The value of the top-level member `key` of the object in [doc, end), or NULL.
static const char *member(const char *doc, const char *end, const char *key, const char **vend) {
    char name[128];
    const char *p = skip_ws(doc, end);
    if (p >= end || *p != '{')
        return NULL;
    p = skip_ws(p + 1, end);
    while (p < end && *p == '"') {
        const char *kend = skip_value(p, end, 1);
        if (!kend)
            return NULL;
        int ok = read_string(p, kend, name, sizeof name) == 0;
        p = skip_ws(kend, end);
        if (p >= end || *p != ':')
            return NULL;
        const char *v = skip_ws(p + 1, end);
        const char *e = skip_value(v, end, 1);
        if (!e)
            return NULL;
        if (ok && strcmp(name, key) == 0) {
            *vend = e;
            return v;
        }
        p = skip_ws(e, end);
        if (p < end && *p == ',')
            p = skip_ws(p + 1, end);
    }
    return NULL;
}

static void print_json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static int fail(const char *version, int code, const char *msg, const char *details) {
    printf("{\"cniVersion\":");
    print_json_string(version);
    printf(",\"code\":%d,\"msg\":", code);
    print_json_string(msg);
    printf(",\"details\":");
    print_json_string(details);
    printf("}\n");
    return 1;
}

// K8S_POD_NAMESPACE from CNI_ARGS ("K=V;K=V").
static void pod_namespace(char *out, size_t size) {
    const char *args = getenv("CNI_ARGS");
    out[0] = 0;
    if (!args)
        return;
    const char *key = "K8S_POD_NAMESPACE=";
    for (const char *p = args; p && *p; p = strchr(p, ';') ? strchr(p, ';') + 1 : NULL) {
        if (strncmp(p, key, strlen(key)) == 0) {
            p += strlen(key);
            size_t n = strcspn(p, ";");
            if (n < size) {
                memcpy(out, p, n);
                out[n] = 0;
            }
            return;
        }
    }
}

static int excluded(const char *conf, const char *end, const char *ns) {
    const char *vend;
    const char *v = member(conf, end, "excludeNamespaces", &vend);
    char name[256];
    if (!v || *v != '[' || !ns[0])
        return 0;
    for (const char *p = skip_ws(v + 1, vend); p < vend && *p == '"';) {
        const char *e = skip_value(p, vend, 1);
        if (!e)
            return 0;
        if (read_string(p, e, name, sizeof name) == 0 && strcmp(name, ns) == 0)
            return 1;
        p = skip_ws(e, vend);
        if (p < vend && *p == ',')
            p = skip_ws(p + 1, vend);
    }
    return 0;
}

// -- talking to the agent -----------------------------------------------------------------

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

// Forward the request; the agent's exit code (>= 0) with its output in *answer, or -1 with
// errno set when the agent cannot be reached or answers nothing usable.
static int ask_agent(const char *path, const char *input, size_t input_len, char **answer) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {.tv_sec = AGENT_TIMEOUT};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        goto failed;
    if (write_all(fd, "CNI/1\n", 6) < 0)
        goto failed;
    for (size_t i = 0; i < sizeof FORWARDED / sizeof *FORWARDED; i++) {
        const char *v = getenv(FORWARDED[i]);
        if (!v)
            continue;
        if (strchr(v, '\n')) {
            errno = EINVAL;
            goto failed;
        }
        if (write_all(fd, FORWARDED[i], strlen(FORWARDED[i])) < 0 || write_all(fd, "=", 1) < 0 ||
            write_all(fd, v, strlen(v)) < 0 || write_all(fd, "\n", 1) < 0)
            goto failed;
    }
    if (write_all(fd, "\n", 1) < 0 || write_all(fd, input, input_len) < 0)
        goto failed;
    shutdown(fd, SHUT_WR);
    char *buf = malloc(MAX_ANSWER + 1);
    size_t len = 0;
    if (!buf)
        goto failed;
    for (;;) {
        ssize_t n = read(fd, buf + len, MAX_ANSWER - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            free(buf);
            goto failed;
        }
        if (n == 0 || (len += (size_t)n) == MAX_ANSWER)
            break;
    }
    close(fd);
    buf[len] = 0;
    char *nl = memchr(buf, '\n', len);
    char *endp;
    long code = nl ? strtol(buf, &endp, 10) : -1;
    if (!nl || endp != nl || code < 0 || code > 255) {
        free(buf);
        errno = EPROTO; // an agent that went away mid-answer
        return -1;
    }
    *answer = nl + 1;
    return (int)code;
failed:;
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

int main(void) {
    signal(SIGPIPE, SIG_IGN); // an agent gone mid-request is EPIPE, answered as unreachable
    char *input = malloc(MAX_INPUT + 1);
    size_t len = 0;
    if (!input)
        return 1;
    for (;;) {
        ssize_t n = read(0, input + len, MAX_INPUT - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || (len += (size_t)n) == MAX_INPUT)
            break;
    }
    input[len] = 0;
    const char *end = input + len;
    const char *command = getenv("CNI_COMMAND");
    command = command ? command : "";

    char version[32] = "1.0.0", path[108] = DEFAULT_SOCKET, ns[256];
    const char *vend;
    const char *v = member(input, end, "cniVersion", &vend);
    if (v && read_string(v, vend, version, sizeof version) != 0)
        strcpy(version, "1.0.0");
    if (strcmp(command, "VERSION") == 0) {
        printf("{\"cniVersion\":");
        print_json_string(version);
        printf(",\"supportedVersions\":" SUPPORTED "}\n");
        return 0;
    }
    v = member(input, end, "agentSocket", &vend);
    if (v && read_string(v, vend, path, sizeof path) != 0)
        return fail(version, 7, "veil-cni: agentSocket is not a usable path", "");

    char *answer = NULL;
    int code = ask_agent(path, input, len, &answer);
    if (code >= 0) {
        fputs(answer, stdout);
        return code;
    }
    char msg[512];
    snprintf(msg, sizeof msg, "veil agent unreachable at %s: %s", path, strerror(errno));
    if (strcmp(command, "DEL") == 0)
        return 0; // nothing of ours is left to undo without the agent; it cleans up itself
    pod_namespace(ns, sizeof ns);
    if (excluded(input, end, ns)) { // the mesh's own pods start before its agent runs
        if (strcmp(command, "ADD") == 0) {
            v = member(input, end, "prevResult", &vend);
            if (!v || *v != '{')
                return fail(version, 7, "veil-cni must be chained after an interface plugin "
                                        "(no prevResult)", "");
            fwrite(v, 1, (size_t)(vend - v), stdout);
            putchar('\n');
        }
        return 0;
    }
    return fail(version, 11, msg,
                "the pod must not start uncaptured; the runtime should retry once the node's "
                "veil agent runs");
}
