"""Is there a Ray head at an address? Asked over gRPC in milliseconds, before any work.

`ray.init(address=...)` against a wrong address retries for minutes with only Ray's own log lines,
and a port that merely accepts TCP (the dashboard, an unrelated service) looks alive to a socket
check. So the preflight asks the head what only a Ray head answers: the GCS's cluster id for
``HOST:PORT``, a gRPC handshake for a Ray Client server (``ray://HOST:PORT``). Imports Ray's
generated protobuf stubs and grpc only (no Ray session, no torch): `plan --dry-run` stays light.
"""

from __future__ import annotations

import grpc
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

DASHBOARD_HINT = ("cluster.address takes the GCS address that `ray start --head` prints (port 6379 by "
                  "default), not the dashboard / job server (port 8265, which `ray job submit --address` takes)")


def probe(host: str, port: int, client: bool, timeout_s: float) -> str | None:
    """None when a Ray GCS (or, with ``client``, a Ray Client server) answers at host:port within
    ``timeout_s``; otherwise why not, in words for an error message."""
    target = f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        try:
            if client:
                grpc.channel_ready_future(channel).result(timeout=timeout_s)
            else:
                stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
                stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
            return None
        except grpc.FutureTimeoutError:
            return f"no gRPC server answers at {target} within {timeout_s:.0f} s"
        except grpc.RpcError as err:
            return _why(err, target, timeout_s)


def _why(err: grpc.RpcError, target: str, timeout_s: float) -> str:
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        # A Ray head, with token authentication on (Ray >= 2.60's default) while this client has it off.
        return (f"the Ray cluster at {target} refused this client's credentials ({details.strip()}): set "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) as the cluster has them")
    if "HTTP/2" in details or "http1" in details.lower():
        return f"an HTTP server answers at {target}, not a Ray GCS: {DASHBOARD_HINT}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"nothing answered at {target} within {timeout_s:.0f} s"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"a gRPC server answers at {target} but it is not a Ray GCS ({details.strip()})"
    reason = details.rsplit(": ", 1)[-1].strip() if details else code.name
    return f"nothing answers at {target} ({reason})"
