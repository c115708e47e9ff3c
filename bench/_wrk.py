"""wrk, the native load generator, driven through pre-signed requests: one script, one result.

Each wrk thread cycles through its own file of requests (`<prefix>.<thread>`), one per line:
the values of the script's signature headers, tab-separated, then the body. Requests are signed
beforehand so that the load generator spends nothing on signing; a thread that wraps around its
file sends a request twice, which the benchmark must report (a redelivery is cheap).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

_LUA = r"""
local counter = 0
local threads = {}
local names = {HEADER_NAMES}

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  pool = {}
  local host = wrk.headers["Host"]
  for line in io.lines(args[1] .. "." .. tid) do
    local fields = {}
    local start = 1
    for _ = 1, #names do
      local tab = line:find("\t", start, true)
      fields[#fields + 1] = line:sub(start, tab - 1)
      start = tab + 1
    end
    local headers = {["Host"] = host, ["Content-Type"] = "application/json"}
    for index, name in ipairs(names) do
      headers[name] = fields[index]
    end
    pool[#pool + 1] = wrk.format("POST", "PATH", headers, line:sub(start))
  end
  position = 0
  wraps = 0
end

function request()
  position = position + 1
  if position > #pool then
    position = 1
    wraps = wraps + 1
  end
  return pool[position]
end

function done(summary, latency, requests)
  local wrapped = 0
  for _, thread in ipairs(threads) do
    wrapped = wrapped + (thread:get("wraps") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"non2xx":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"timeout":%d,"wraps":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    wrapped, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def lua_script(path: str, headers: tuple[str, ...]) -> str:
    """The script POSTing to `path` with `headers` taken, in order, from each request line."""
    names = ", ".join(json.dumps(name) for name in headers)
    return _LUA.replace("{HEADER_NAMES}", "{" + names + "}").replace("PATH", path)


@dataclass
class WrkResult:
    """What one wrk run measured."""

    requests: int
    duration_s: float
    non2xx: int
    socket_errors: int
    wraps: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        """Requests answered per second."""
        return self.requests / self.duration_s

    @property
    def ok(self) -> int:
        """Requests answered 2xx."""
        return self.requests - self.non2xx


def run_wrk(
    url: str,
    script: Path,
    prefix: Path,
    *,
    threads: int,
    connections: int,
    duration_s: int,
    timeout_s: int | None = None,
) -> WrkResult:
    """One wrk run against `url` through the requests under `prefix`; `timeout_s` per request."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s"]
    if timeout_s is not None:
        argv += ["--timeout", f"{timeout_s}s"]
    argv += ["-s", str(script), url, "--", str(prefix)]
    done = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=duration_s + 90
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            data = json.loads(line.removeprefix("BENCHJSON "))
            return WrkResult(
                requests=data["requests"],
                duration_s=data["duration_us"] / 1e6,
                non2xx=data["non2xx"],
                socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
                wraps=data["wraps"],
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                max_ms=data["max_us"] / 1000,
            )
    raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
