"""Traffic that must survive an agent hand-over (run in a pod: python3 -c TRAFFIC IP SECONDS
MARKER): 4 long-lived keep-alive connections (a request every 0.2 s) and 2 streams of new
connections to IP:8080 for SECONDS; prints "started", then a JSON summary of what failed."""

from __future__ import annotations

TRAFFIC = """
import json, socket, sys, threading, time
target, seconds, marker = sys.argv[1], float(sys.argv[2]), sys.argv[3]
request = f"GET / HTTP/1.1\\r\\nHost: x\\r\\nX-Marker: {marker}\\r\\n\\r\\n".encode()
out = {"long": [], "new_ok": 0, "new_errors": []}
lock = threading.Lock()

def exchange(s):
    s.sendall(request)
    got = b""
    while b"\\r\\n\\r\\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the mesh")
        got += chunk
    head, _, body = got.partition(b"\\r\\n\\r\\n")
    fields = dict(l.split(b":", 1) for l in head.split(b"\\r\\n")[1:])
    length = int({k.lower(): v for k, v in fields.items()}[b"content-length"])
    while len(body) < length:
        body += s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head[:40]

def long_lived():
    done, error = 0, None
    try:
        s = socket.create_connection((target, 8080), timeout=10)
        end = time.time() + seconds
        while time.time() < end:
            exchange(s)
            done += 1
            time.sleep(0.2)
        s.close()
    except Exception as e:
        error = repr(e)
    with lock:
        out["long"].append({"requests": done, "error": error})

def new_connections():
    end = time.time() + seconds
    while time.time() < end:
        try:
            with socket.create_connection((target, 8080), timeout=10) as s:
                exchange(s)
            with lock:
                out["new_ok"] += 1
        except Exception as e:
            with lock:
                out["new_errors"].append(repr(e))
        time.sleep(0.05)

threads = [threading.Thread(target=long_lived) for _ in range(4)]
threads += [threading.Thread(target=new_connections) for _ in range(2)]
for t in threads:
    t.start()
print("started", flush=True)
for t in threads:
    t.join()
print(json.dumps(out), flush=True)
"""
