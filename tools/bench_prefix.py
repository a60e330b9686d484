#!/usr/bin/env python3
"""Time to first token / audio with and without a cached prefix, and bytes per cached token.

    tools/bench_prefix.py text SMOLLM2.gguf [--system-tokens 1500] [--reps 3] [--peer DIR]
        A long system prompt (the Jargon File) and short questions. Cold: a system prompt the server has
        not seen; warm: the same system prompt with another question. ccsm and llama-server
        (`cache_prompt`, one slot) alternate, best of --reps. Then ccsm's bytes per cached token for
        f16 / q8_0 / q4_0 prefixes (--prefix-cache-type) beside llama-server's host-RAM prompt cache
        (its log's size of the cached state), for the same prompt.
    tools/bench_prefix.py speech CSM.gguf --codec MIMI.gguf --voice WAV --voice-text TEXT [--clients 1,4]
        A voice from a recording (encoded once by `ccsm-infer encode`, given as frames). Cold: a server
        without the prefix cache; warm: one that prefilled the voice at start-up. Time to first audio at
        each client count (after one untimed request without the voice), best of --reps.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_server import wait_healthy  # noqa: E402

CCSM = os.environ.get("CCSM", os.path.join(HERE, "..", "target", "release", "ccsm-infer"))


def post_stream(url, path, body, first):
    """POSTs a streaming request; `first` gets the seconds until the first data chunk."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.time()
    with urllib.request.urlopen(req, timeout=600) as r:
        while True:
            chunk = r.read1(65536) if hasattr(r, "read1") else r.read(4096)
            if not chunk:
                break
            if first[0] is None and (path != "/v1/chat/completions" or b'"content":"' in chunk and b'"content":""' not in chunk):
                first[0] = time.time() - t
    return first[0]


class Running:
    def __init__(self, cmd, url, log=None):
        self.log = open(log or os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        self.url = url
        wait_healthy(url, self.proc, 600)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def metrics(url):
    out = {}
    for line in urllib.request.urlopen(url + "/metrics").read().decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def system_prompt(tokens):
    words = open("/usr/share/jargon/jargon.txt" if os.path.exists("/usr/share/jargon/jargon.txt") else os.path.join(HERE, "..", "README.md"),
                 errors="replace").read().split()
    # About 2.5 tokens a word for SmolLM2's tokenizer on the Jargon File; the table says the count.
    return lambda rep: f"Session {rep}. You answer from this text:\n" + " ".join(words[2000 + rep * 50: 2000 + rep * 50 + int(tokens / 2.5)])


def text(args):
    make_system = system_prompt(args.system_tokens)
    port = 18400
    engines = {
        "ccsm": lambda: Running([CCSM, "serve", args.model, "--port", str(port), "-t", "2", "--parallel", "1", "-c", "2048"], f"http://127.0.0.1:{port}"),
        "llama-server": lambda: Running([os.path.join(args.peer, "llama-server"), "-m", args.model, "--port", str(port + 1), "-t", "2",
                                         "-np", "1", "-c", "2048", "-fa", "off"], f"http://127.0.0.1:{port + 1}"),
    }
    best = {(e, k): float("inf") for e in engines for k in ("cold", "warm")}
    prompt_tokens = {}
    for rep in range(args.reps):
        for name, launch in engines.items():
            server = launch()
            try:
                system = make_system(rep)
                for kind, question in (("cold", "What is a kludge?"), ("warm", "What does grok mean?")):
                    first = [None]
                    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                            "max_tokens": 8, "temperature": 0, "stream": True}
                    if name == "llama-server":
                        body["cache_prompt"] = True  # its default too; ccsm refuses fields it does not know
                    post_stream(server.url, "/v1/chat/completions", body, first)
                    best[(name, kind)] = min(best[(name, kind)], first[0])
                if name == "ccsm":
                    m = metrics(server.url)
                    prompt_tokens["ccsm"] = m["ccsm_prompt_tokens_total"] + m["ccsm_prefix_cache_rows_reused_total"]
            finally:
                server.close()
    print(f"\nSmolLM2, a system prompt of ~{args.system_tokens} tokens ({prompt_tokens['ccsm'] / 2:.0f} prompt tokens a request;"
          f" 2 threads, best of {args.reps}): time to first token, s")
    print("| engine | cold | warm | warm / cold |\n|---|---:|---:|---:|")
    for name in engines:
        c, w = best[(name, "cold")], best[(name, "warm")]
        print(f"| {name} | {c:.3f} | {w:.3f} | {w / c:.3f} |")
    print(f"| ccsm warm / llama-server warm | | {best[('ccsm', 'warm')] / best[('llama-server', 'warm')]:.2f}× | |")

    # Bytes per cached token.
    system = make_system(99)
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi."}], "max_tokens": 1, "temperature": 0}
    print("\nBytes per cached token (the prompt above, one request):")
    print("| engine | prefix type | bytes / token |\n|---|---|---:|")
    for t in ["f16", "q8_0", "q4_0"]:
        server = Running([CCSM, "serve", args.model, "--port", str(port), "-t", "2", "--parallel", "1", "-c", "2048",
                          "--prefix-cache-type", t], f"http://127.0.0.1:{port}")
        try:
            req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            usage = json.loads(urllib.request.urlopen(req).read())["usage"]
            m = metrics(server.url)
            rows = usage["prompt_tokens"]  # the answer's one token is sampled, never fed
            print(f"| ccsm | {t} | {m['ccsm_prefix_cache_bytes'] / rows:,.0f} |")
        finally:
            server.close()
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        server = Running([os.path.join(args.peer, "llama-server"), "-m", args.model, "--port", str(port + 1), "-t", "2", "-np", "1",
                          "-c", "2048", "-fa", "off", "--cache-ram", "4096"], f"http://127.0.0.1:{port + 1}", log=log.name)
        try:
            for q in ["Hi.", "Hello there, who are you?"]:
                b = dict(body, messages=[body["messages"][0], {"role": "user", "content": q}])
                req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(b).encode(), headers={"Content-Type": "application/json"})
                usage = json.loads(urllib.request.urlopen(req).read())["usage"]
        finally:
            server.close()
        text = open(log.name).read()
    sizes = re.findall(r"prompt cache.*?(\d+) tokens.*?([\d.]+) MiB", text) or re.findall(r"- prompt .*?(\d+) tokens.*?([\d.]+) MiB", text)
    if sizes:
        tokens, mib = sizes[-1]
        print(f"| llama-server --cache-ram | f16 (its cache's type) | {float(mib) * (1 << 20) / int(tokens):,.0f} |")
    else:
        lines = [l for l in text.splitlines() if "cache" in l.lower()][-8:]
        print("| llama-server --cache-ram | f16 | (size not found in its log; lines mentioning the cache follow) |")
        print("\n".join(lines))


def speech(args):
    with tempfile.TemporaryDirectory() as voices:
        encoded = json.loads(subprocess.run([CCSM, "encode", args.voice, "--codec", args.codec, "-q"], check=True, capture_output=True).stdout)
        json.dump({"speaker": 0, "context": [{"speaker": 0, "text": args.voice_text, "frames": encoded["frames"]}]},
                  open(os.path.join(voices, "voice.json"), "w"))
        print(f"voice: {len(encoded['frames'])} frames ({len(encoded['frames']) * 0.08:.1f} s)")
        clients = [int(c) for c in args.clients.split(",")]
        best = {}
        port = 18500
        for rep in range(args.reps):
            for kind in ("cold", "warm"):
                extra = ["--no-prefix-cache"] if kind == "cold" else []
                server = Running([CCSM, "serve", args.model, "--codec", args.codec, "--voices", voices, "--port", str(port), "-t", "2",
                                  "--parallel", str(max(clients)), "-c", "1024"] + extra, f"http://127.0.0.1:{port}")
                try:
                    # One request first, not timed: the first graphs and buffers of a fresh process.
                    post_stream(server.url, "/v1/audio/speech", {"input": "Warm up.", "voice": "0", "max_audio_ms": 80, "response_format": "pcm"}, [None])
                    for n in clients:
                        firsts = [[None] for _ in range(n)]
                        body = lambda i: {"input": f"Line number {i + rep} of the test, spoken aloud.", "voice": "voice", "max_audio_ms": 160,
                                          "response_format": "pcm", "seed": i}
                        threads = [threading.Thread(target=post_stream, args=(server.url, "/v1/audio/speech", body(i), firsts[i])) for i in range(n)]
                        [t.start() for t in threads]
                        [t.join() for t in threads]
                        mean = sum(f[0] for f in firsts) / n
                        best[(kind, n)] = min(best.get((kind, n), float("inf")), mean)
                finally:
                    server.close()
        print(f"\ncsm-1b-shape + mimi-shape, a {len(encoded['frames']) * 0.08:.1f}-s voice (2 threads, best of {args.reps}): mean time to first audio, s")
        print("| clients | cold | warm | warm / cold |\n|---:|---:|---:|---:|")
        for n in clients:
            c, w = best[("cold", n)], best[("warm", n)]
            print(f"| {n} | {c:.3f} | {w:.3f} | {w / c:.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["text", "speech"])
    ap.add_argument("model")
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peer", default=os.path.expanduser("~/.cache/ccsm-peer/build/bin"))
    ap.add_argument("--codec")
    ap.add_argument("--voice")
    ap.add_argument("--voice-text", default="")
    ap.add_argument("--clients", default="1,4")
    args = ap.parse_args()
    text(args) if args.mode == "text" else speech(args)


if __name__ == "__main__":
    main()
