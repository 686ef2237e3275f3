"""nginx for the bench, in two roles: the upstream that answers 200, and a reverse proxy.

Each instance has a folder of its own (config, pid file, logs, temp paths)
and is started with `-p`, `-c` and `-e` pointing into it, so nothing of the
system's nginx (/etc/nginx, /var/log/nginx, /var/lib/nginx, /run) is read or
written. One worker, on 127.0.0.1 only, no access log.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.upstream import BODY
from deploy.process import Process

COMMON = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
{servers}
}}
"""

# The same 1 KiB JSON document the aiohttp app answers, so both upstreams send the same bytes.
UPSTREAM = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
"""

# Keep-alive to the upstream needs HTTP/1.1 and an emptied Connection header.
PROXY = """\
    upstream app {{
        server {target};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def _process(name: str, workdir: Path, servers: str, nginx: str,
             prefix: Sequence[str]) -> Process:
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(COMMON.format(dir=folder, servers=servers))
    argv = [*prefix, nginx, "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")]
    return Process(name, argv, stdout_path=folder / "stdout.log")


def upstream(workdir: Path, *, port: int, nginx: str, prefix: Sequence[str] = ()) -> Process:
    """nginx answering every request with 200 and `BODY`, on 127.0.0.1:`port`."""
    body = BODY.decode()
    assert "'" not in body and "\\" not in body  # nginx's single-quoted string
    return _process("nginx-upstream", workdir, UPSTREAM.format(port=port, body=body),
                    nginx, prefix)


def proxy(workdir: Path, *, port: int, target: str, nginx: str,
          prefix: Sequence[str] = ()) -> Process:
    """nginx on 127.0.0.1:`port` proxying to `target` (host:port), keep-alive both sides."""
    return _process("nginx-proxy", workdir, PROXY.format(port=port, target=target),
                    nginx, prefix)
