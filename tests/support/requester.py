"""Run inside a lab pod (`veil lab exec <pod> -- python requester.py '<json>'`): sends each
request on a new connection, as the conformance suites' echo clients do, and prints every
answer as JSON: status, response headers, body; or the error. The Host header is sent as
given (it may differ from the address connected to), so GAMMA's hostname cases can be sent."""

from __future__ import annotations

import http.client
import json
import sys


def one(r: dict[str, object]) -> dict[str, object]:
    address = str(r["address"])
    host, _, port = address.rpartition(":") if address.count(":") == 1 else (address, "", "")
    conn = http.client.HTTPConnection(host or address, int(port or 80), timeout=10)
    try:
        conn.putrequest(
            str(r.get("method", "GET")),
            str(r.get("path", "/")),
            skip_host=True,
            skip_accept_encoding=True,
        )
        conn.putheader("Host", str(r.get("host") or address))
        for k, v in dict(r.get("headers") or {}).items():  # type: ignore[call-overload]
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        return {
            "status": resp.status,
            "headers": [[k.lower(), v] for k, v in resp.getheaders()],
            "body": body.decode(errors="replace"),
        }
    except (OSError, http.client.HTTPException) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()


def main() -> None:
    print(json.dumps([one(r) for r in json.loads(sys.argv[1])]))


if __name__ == "__main__":
    main()
