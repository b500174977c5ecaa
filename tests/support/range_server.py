#!/usr/bin/env python3
"""range_server.py PORT DIR: serves DIR on 127.0.0.1:PORT with single byte
ranges (206, Content-Range), a strong ETag and If-Range, which Python's
http.server does not have; and counts the body bytes it sent in
DIR/.served (one line per request: path and bytes). The VM tests serve
images to the guest with it, and the benchmarks to every peer."""
import email.utils
import os
import re
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

PORT, ROOT = int(sys.argv[1]), sys.argv[2]


class Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=ROOT, **kwargs)

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        stat = os.stat(path)
        size = stat.st_size
        etag = '"%x-%x"' % (stat.st_mtime_ns, size)
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted or "")
        if match and (if_range is None or if_range == etag):
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", "bytes */%d" % size)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end + 1 - start))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
        self.end_headers()
        sent = 0
        with open(path, "rb") as f:
            # sendfile(2): the kernel copies the file to the socket, so the
            # server costs little CPU beside the client it serves (a loop of
            # reads and writes took more than the agent's SHA-256).
            try:
                sent = self.connection.sendfile(f, start, end + 1 - start)
            except (BrokenPipeError, ConnectionResetError):
                sent = f.tell() - start
        with open(os.path.join(ROOT, ".served"), "a") as log:
            log.write("%s %d\n" % (self.path, sent))


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
