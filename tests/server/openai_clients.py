#!/usr/bin/env python3
"""The server against the real `openai` client (and raw HTTP for what the client hides).

Run by `cargo test` (crates/ccsm-infer/tests/server.rs):
    openai_clients.py BIN MODELS_DIR {text|speech|queue|layouts|stalled}
Each part starts its own `ccsm-infer serve` on a free loopback port and checks, against references that do
not come from the server (the CLI's single-session runs, WAV/PCM byte math, the budget it was given):
  text   completions and chat, streamed and whole; stop sequences; a wrong key; 4xx in OpenAI's shape;
         a client closing its stream early (its session and bytes freed); 8 clients at once giving what
         each gives alone while KV bytes stay within the budget; memory flat over 200 requests.
  speech wav and pcm, whole and streamed, SSE events, voices, 4xx; concurrent sessions equal alone.
  queue  a full queue answers 429 with Retry-After, and nothing accepted is lost.
  stalled a client that stops reading holds the only connection slot; the write deadline closes it,
         and /health answers.
  layouts per-layer cache types: sessions of a --kv-layout (and of a --kv-plan, and with a --kv-recent
         window) answer what the CLI gives with the same layout; under a budget the planner's layouts admit sessions that f16 could not.
"""

import base64
import io
import json
import math
import os
import re
import socket
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import wave

import openai

KEY = "test-key-123"


class Server:
    """`ccsm-infer serve MODEL ARGS` on a free port; `url` once /health says ok."""

    def __init__(self, bin_path, model, *args, key=KEY):
        cmd = [bin_path, "serve", model, "--port", "0", "-t", "2", *args]
        if key:
            cmd += ["--api-key", key]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.key = key
        self.log = []
        line = ""
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"ccsm server on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        else:
            raise RuntimeError("server did not start: " + "".join(self.log))
        if not hasattr(self, "url"):
            raise RuntimeError("server exited: " + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()
        while time.time() < deadline:
            status, _, _ = self.http("GET", "/health", auth=False)
            if status == 200:
                return
            assert status == 503, status
            time.sleep(0.05)
        raise RuntimeError("server never became healthy")

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def client(self, key=None):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.key or "none", max_retries=0, timeout=120)

    def http(self, method, path, body=None, auth=True, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth and self.key:
            req.add_header("Authorization", "Bearer " + self.key)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def metrics(self):
        status, _, body = self.http("GET", "/metrics")
        assert status == 200, status
        values = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        assert self.proc.returncode is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_error(server, status_want, method, path, body=None, raw=None, auth=True, contains=""):
    status, headers, text = server.http(method, path, body, auth=auth, raw=raw)
    assert status == status_want, (path, status, text[:300])
    err = json.loads(text)["error"]
    assert set(err) >= {"message", "type", "code"}, err
    assert contains.lower() in err["message"].lower(), (contains, err)
    return headers


def cli_text(bin_path, model, prompt, n, chat=False, extra=()):
    """The single-session path: the CLI's greedy continuation."""
    cmd = [bin_path, model, "-p", prompt, "-n", str(n), "--temp", "0", "-t", "2", "--json", "-q", *extra]
    if chat:
        cmd.append("--chat")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["text"]


def text_part(bin_path, models):
    model = os.path.join(models, "SmolLM2-135M-Instruct.Q4_1.gguf")
    # 8 sessions may run, but the budget holds 2 sessions' caches of 256 cells (the attention window's
    # granularity) at f16 (SmolLM2: 30 layers, 3 KV heads of 64: 23,040 bytes a cell, 5.9 MB a session),
    # so admission has to queue; --no-adapt keeps every cache f16 so outputs can equal the single-session ones.
    budget_mib = 12
    with Server(bin_path, model, "--parallel", "8", "-c", "256", "--max-memory-mb", str(budget_mib), "--no-adapt") as s:
        c = s.client()
        prompt = "The Jargon File is a glossary of"
        whole = c.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0)
        text = whole.choices[0].text
        assert text == cli_text(bin_path, model, prompt, 12), (text, cli_text(bin_path, model, prompt, 12))
        assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0, whole.usage
        assert whole.choices[0].finish_reason == "length"
        parts = list(c.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert "".join(p.choices[0].text for p in parts) == text
        assert parts[-1].choices[0].finish_reason == "length"

        # A stop sequence cuts the text before it, also when streamed.
        word = text.split()[2]
        cut = text[: text.index(word)]
        stopped = c.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stop=[word])
        assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop", (stopped, word)
        streamed = c.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stop=[word], stream=True)
        assert "".join(p.choices[0].text for p in streamed) == cut

        # Chat through the GGUF's template equals the CLI's --chat.
        question = "What is a hacker?"
        answer = c.chat.completions.create(model="any", messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0)
        content = answer.choices[0].message.content
        assert content and content == cli_text(bin_path, model, question, 16, chat=True), content
        chunks = list(c.chat.completions.create(model="any", messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == content

        # Keys and bad requests.
        try:
            s.client(key="wrong").completions.create(model="any", prompt="x", max_tokens=1)
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError:
            pass
        check_error(s, 401, "GET", "/v1/models", auth=False, contains="api key")
        assert s.http("GET", "/health", auth=False)[0] == 200
        check_error(s, 400, "POST", "/v1/completions", raw=b'{"prompt": ', contains="not a valid request")
        check_error(s, 400, "POST", "/v1/completions", {"prompt": "x", "n": 2}, contains="n must be 1")
        check_error(s, 400, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 10_000}, contains="context")
        check_error(s, 400, "POST", "/v1/completions", {"prompt": "x", "temperature": -1}, contains="temperature")
        check_error(s, 400, "POST", "/v1/chat/completions", {"messages": []}, contains="at least one message")
        check_error(s, 400, "POST", "/v1/audio/speech", {"input": "hi", "voice": "0"}, contains="text model")
        # A text body past its 2 MiB limit (a little past: the server stops reading at the limit, and a
        # client that sends all before it reads needs the rest to fit the socket buffers).
        check_error(s, 413, "POST", "/v1/completions", raw=b" " * ((2 << 20) + (64 << 10)), contains="larger than 2097152 bytes")
        check_error(s, 404, "GET", "/v1/nothing-here", contains="no such endpoint")
        check_error(s, 405, "GET", "/v1/completions", contains="another method")
        try:
            c.completions.create(model="any", prompt="x", max_tokens=1, extra_body={"stop": ["a", "b", "c", "d", "e"]})
            raise AssertionError("five stop strings were accepted")
        except openai.BadRequestError as e:
            assert "stop" in str(e)

        # A client that leaves mid-stream: its session ends and its bytes go back.
        before = s.metrics()
        with c.completions.with_streaming_response.create(model="any", prompt=prompt, max_tokens=200, temperature=0, stream=True) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break
        deadline = time.time() + 20
        while time.time() < deadline:
            m = s.metrics()
            if m["ccsm_requests_running"] == 0 and m["ccsm_kv_cache_bytes"] == 0:
                break
            time.sleep(0.05)
        assert m["ccsm_requests_running"] == 0 and m["ccsm_kv_cache_bytes"] == 0, m
        assert m['ccsm_requests_total{outcome="cancelled"}'] == before['ccsm_requests_total{outcome="cancelled"}'] + 1, m
        assert m["ccsm_tokens_generated_total"] - before["ccsm_tokens_generated_total"] < 150, "generation went on after the client left"

        # 8 clients at once: each gets what it gets alone (same seed), the KV bytes never pass the budget.
        prompts = [f"Story {i}: once upon a time, a hacker named {name}" for i, name in enumerate("Ada Bob Cy Dee Eve Fox Gus Hal".split())]

        def ask(p, seed):
            r = c.completions.create(model="any", prompt=p, max_tokens=24, temperature=0.8, top_p=0.95, seed=seed)
            return r.choices[0].text

        alone = [ask(p, 100 + i) for i, p in enumerate(prompts)]
        together = [None] * len(prompts)
        peak = [0.0, 0.0]
        stop_polling = threading.Event()

        def poll():
            while not stop_polling.is_set():
                m = s.metrics()
                peak[0] = max(peak[0], m["ccsm_kv_cache_bytes"])
                peak[1] = max(peak[1], m["ccsm_requests_running"])
                assert m["ccsm_kv_cache_bytes"] <= m["ccsm_kv_cache_budget_bytes"], m
                time.sleep(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        workers = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(prompts[i], 100 + i))) for i in range(len(prompts))]
        [w.start() for w in workers]
        [w.join() for w in workers]
        stop_polling.set()
        poller.join()
        assert together == alone, (together, alone)
        assert 0 < peak[0] <= budget_mib << 20, peak
        assert peak[1] >= 2, f"never more than {peak[1]} sessions at once"
        print(f"8 clients: outputs equal alone; peak KV {peak[0] / 2**20:.2f} MiB of {budget_mib} MiB, peak running {peak[1]:.0f}")

        # Memory stays flat over 200 requests (8 clients at a time).
        def burst(n):
            done = []
            def one(i):
                done.append(c.completions.create(model="any", prompt=prompts[i % 8], max_tokens=4, temperature=0.7, seed=i).usage.completion_tokens)
            for first in range(0, n, 8):
                ts = [threading.Thread(target=one, args=(first + j,)) for j in range(min(8, n - first))]
                [t.start() for t in ts]
                [t.join() for t in ts]
            assert len(done) == n
        burst(40)
        rss_start = s.rss_kib()
        burst(200)
        rss_end = s.rss_kib()
        growth_mib = (rss_end - rss_start) / 1024
        print(f"200 requests: RSS {rss_start / 1024:.1f} -> {rss_end / 1024:.1f} MiB")
        assert growth_mib < 16, f"RSS grew {growth_mib:.1f} MiB over 200 requests"
        m = s.metrics()
        assert m["ccsm_kv_cache_bytes"] == 0 and m["ccsm_requests_running"] == 0 and m["ccsm_requests_waiting"] == 0, m


def wav_data(b):
    assert b[:4] == b"RIFF" and b[8:16] == b"WAVEfmt ", b[:16]
    assert b[36:40] == b"data", b[36:40]
    return b[44:]


def speech_part(bin_path, models):
    model = os.path.join(models, "tiny-csm.gguf")
    frame_bytes = 1920 * 2
    with tempfile.TemporaryDirectory() as voices:
        with open(os.path.join(voices, "narrator.json"), "w") as f:
            json.dump({"speaker": 1, "context": [{"speaker": 1, "text": "Good evening.", "frames": []}]}, f)
        # A voice from a recording: espeak-ng's sentence, its transcript, its speaker.
        recording = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools", "reference", "fixtures", "audio", "speech-espeak.wav")
        shutil.copy(recording, os.path.join(voices, "keeper.wav"))
        spoken = "Hello, this is a voice to keep."
        with open(os.path.join(voices, "keeper.txt"), "w") as f:
            f.write(spoken + "\n")
        with open(os.path.join(voices, "keeper.json"), "w") as f:
            json.dump({"speaker": 2}, f)
        with Server(bin_path, model, "--parallel", "3", "--voices", voices) as s:
            c = s.client()
            text = "Hello there, this is a test."
            extra = {"seed": 7, "max_audio_ms": 800}
            wav = c.audio.speech.create(model="csm", voice="0", input=text, response_format="wav", extra_body=extra).content
            pcm = wav_data(wav)
            assert 0 < len(pcm) <= 10 * frame_bytes and len(pcm) % frame_bytes == 0, len(pcm)
            # The same request through the CLI (the single-session path): the same samples.
            with tempfile.NamedTemporaryFile(suffix=".wav") as out:
                subprocess.run([bin_path, model, "-p", text, "--speaker", "0", "-n", "10", "--seed", "7", "-t", "2", "-q", "-o", out.name], check=True)
                cli = open(out.name, "rb").read()
            assert cli[44:] == pcm, (len(cli), len(wav))

            raw = c.audio.speech.create(model="csm", voice="0", input=text, response_format="pcm", extra_body=extra).content
            assert raw == pcm
            with c.audio.speech.with_streaming_response.create(model="csm", voice="0", input=text, extra_body=extra) as r:
                assert r.headers["content-type"] == "audio/wav"
                chunks = list(r.iter_bytes())
            assert b"".join(chunks) == wav
            assert wav[4:8] == b"\xff\xff\xff\xff", "a streamed WAV has an unknown length"

            # SSE: base64 deltas that add up to the PCM, then done with usage.
            status, headers, body = s.http("POST", "/v1/audio/speech", {"input": text, "voice": "0", "response_format": "pcm", "stream_format": "sse", **extra})
            assert status == 200 and headers["content-type"].startswith("text/event-stream"), (status, headers)
            events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
            deltas = [e for e in events if e["type"] == "speech.audio.delta"]
            assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == pcm
            assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] == len(pcm) // frame_bytes, events[-1]

            # Voices.
            status, _, body = s.http("GET", "/v1/audio/voices")
            listed = json.loads(body)["voices"]
            assert status == 200 and [v["id"] for v in listed] == ["keeper", "narrator"], body
            assert abs(listed[0]["seconds"] - 2.034) < 0.01 and listed[1]["seconds"] is None, listed
            # The recording voice answers what the CLI gives with the same recording and seed.
            kept = c.audio.speech.create(model="csm", voice="keeper", input=text, response_format="pcm", extra_body=extra).content
            with tempfile.NamedTemporaryFile(suffix=".wav") as out:
                subprocess.run([bin_path, model, "-p", text, "--speaker", "2", "--voice-audio", recording, "--voice-text", spoken,
                                "-n", "10", "--seed", "7", "-t", "2", "-q", "-o", out.name], check=True)
                assert open(out.name, "rb").read()[44:] == kept, "the server's recording voice differs from the CLI's"
            again = c.audio.speech.create(model="csm", voice="keeper", input=text, response_format="pcm", extra_body=extra).content
            assert again == kept, "encoded once, the same after"
            # A client's segment cannot name a file on the server; a recording comes inline, and speaks as
            # the same context given as the frames `encode` writes.
            check_error(s, 400, "POST", "/v1/audio/speech", {"input": text, "context": [{"speaker": 0, "text": "x", "audio": "/etc/passwd"}]},
                        contains="data URI")
            encoded = json.loads(subprocess.run([bin_path, "encode", recording, "--codec", model, "-q"], check=True, capture_output=True).stdout)
            as_frames = {"speaker": 2, "text": spoken, "frames": encoded["frames"]}
            uri = "data:audio/wav;base64," + base64.b64encode(open(recording, "rb").read()).decode()
            as_audio = {"speaker": 2, "text": spoken, "audio": uri}
            with_frames = c.audio.speech.create(model="csm", voice="2", input=text, response_format="pcm", extra_body={**extra, "context": [as_frames]}).content
            with_audio = c.audio.speech.create(model="csm", voice="2", input=text, response_format="pcm", extra_body={**extra, "context": [as_audio]}).content
            assert with_audio == with_frames == kept, "an uploaded recording speaks as its frames (and as the voice made from it)"
            check_error(s, 400, "POST", "/v1/audio/speech",
                        {"input": text, "context": [{"speaker": 0, "text": "x", "audio": "data:audio/wav;base64," + base64.b64encode(b"RIFF junk").decode()}]},
                        contains="context[0].audio")
            # Recordings are encoded beside the engine: while a long upload (9.5 minutes) is encoding,
            # another request is admitted, speaks and finishes.
            long_wav = io.BytesIO()
            with wave.open(long_wav, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(1)
                w.setframerate(8000)
                w.writeframes(bytes((128 + int(60 * math.sin(i * 0.05))) & 0xFF for i in range(8000)) * 570)
            long_uri = "data:audio/wav;base64," + base64.b64encode(long_wav.getvalue()).decode()
            heard = {}
            slow = threading.Thread(target=lambda: heard.__setitem__("answer", s.http("POST", "/v1/audio/speech", {
                "input": text, "response_format": "pcm", "max_audio_ms": 160, "seed": 1,
                "context": [{"speaker": 0, "text": "A long recording.", "audio": long_uri}]})))
            slow.start()
            deadline = time.time() + 60
            while s.metrics().get("ccsm_recordings_encoding", 0) < 1 and slow.is_alive() and time.time() < deadline:
                time.sleep(0.01)
            assert s.metrics()["ccsm_recordings_encoding"] == 1, "the long upload is encoding"
            beside = c.audio.speech.create(model="csm", voice="0", input=text, response_format="pcm", extra_body=extra).content
            assert beside == pcm
            assert s.metrics()["ccsm_recordings_encoding"] == 1, "a request spoke while the upload was still encoding"
            slow.join()
            # Encoded (7125 frames), it is then too long for a session's context: refused by the engine.
            status, _, body = heard["answer"]
            assert status == 400 and b"positions" in body, (status, body[:300])
            narrated = c.audio.speech.create(model="csm", voice="narrator", input=text, response_format="pcm", extra_body=extra).content
            assert len(narrated) % frame_bytes == 0 and narrated != pcm
            for bad, want in [
                ({"voice": "alloy"}, "unknown voice"),
                ({"response_format": "mp3"}, "mp3"),
                ({"speed": 2.0}, "speed"),
                ({"stream_format": "chunks"}, "stream_format"),
                ({"input": "x" * 4097}, "4096"),
                ({"input": ""}, "4096"),
                ({"max_audio_ms": 10_000_000}, "positions"),
            ]:
                check_error(s, 400, "POST", "/v1/audio/speech", {"input": text, "voice": "0", **bad}, contains=want)
            try:
                c.audio.speech.create(model="csm", voice="alloy", input=text)
                raise AssertionError("an unknown voice was accepted")
            except openai.BadRequestError as e:
                assert "unknown voice" in str(e)
            check_error(s, 400, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, contains="speech model")

            # Three sessions at once: each the same audio as alone.
            seeds = [11, 12, 13]
            alone = [c.audio.speech.create(model="csm", voice="0", input=text, response_format="pcm", extra_body={"seed": sd, "max_audio_ms": 640}).content for sd in seeds]
            together = [None] * 3
            ts = [threading.Thread(target=lambda i=i: together.__setitem__(i, c.audio.speech.create(
                model="csm", voice="0", input=text, response_format="pcm", extra_body={"seed": seeds[i], "max_audio_ms": 640}).content)) for i in range(3)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            assert together == alone
            m = s.metrics()
            assert m["ccsm_frames_generated_total"] > 0 and m["ccsm_time_to_first_audio_seconds_count"] >= 8, m
            assert m["ccsm_kv_cache_bytes"] == 0, m
            print("speech: wav/pcm/stream/sse agree with the CLI; 3 concurrent sessions equal alone")


def queue_part(bin_path, models):
    # One session at a time and one place in the queue. The first request holds the session for
    # seconds (SmolLM2, 200 tokens past end of text; the tiny model would take milliseconds), and the
    # others are sent once it runs: whatever their arrival order, one waits and four are told to retry.
    model = os.path.join(models, "SmolLM2-135M-Instruct.Q4_1.gguf")
    with Server(bin_path, model, "--parallel", "1", "--max-queue", "1", "-c", "256", key=None) as s:
        results = []

        def one(body):
            status, headers, text = s.http("POST", "/v1/completions", body)
            results.append((status, headers, text))

        long = {"prompt": "hello world", "max_tokens": 200, "temperature": 0.5, "seed": 0, "ignore_eos": True}
        first = threading.Thread(target=one, args=(long,))
        first.start()
        deadline = time.time() + 30
        while s.metrics()["ccsm_requests_running"] < 1:
            assert time.time() < deadline, "the first request never ran"
            time.sleep(0.005)
        short = [{"prompt": "hello world", "max_tokens": 4, "temperature": 0.5, "seed": i, "ignore_eos": True} for i in range(1, 6)]
        ts = [threading.Thread(target=one, args=(body,)) for body in short]
        [t.start() for t in ts]
        [t.join() for t in ts + [first]]
        codes = sorted(r[0] for r in results)
        assert codes == [200, 200, 429, 429, 429, 429], codes
        for status, headers, body in results:
            if status == 429:
                assert headers.get("retry-after") == "1" and json.loads(body)["error"]["code"] == "queue_full"
            else:
                assert status == 200 and json.loads(body)["usage"]["completion_tokens"] > 0
        # Without max_tokens a request generates as far as the session's context allows (-c 256).
        status, _, body = s.http("POST", "/v1/completions", {"prompt": "hello world", "temperature": 0.5, "seed": 1, "ignore_eos": True})
        usage = json.loads(body)["usage"]
        assert status == 200 and usage["prompt_tokens"] + usage["completion_tokens"] == 256, (status, body[:300])
        # The engine counts a session's outcome when it retires it, which may be just after its
        # response is written: wait for it (bounded) before reading the totals.
        deadline = time.time() + 5
        while (m := s.metrics())["ccsm_requests_running"] > 0 and time.time() < deadline:
            time.sleep(0.01)
        assert m['ccsm_requests_total{outcome="rejected"}'] == codes.count(429)
        assert m['ccsm_requests_total{outcome="ok"}'] == codes.count(200) + 1, m
        print(f"queue: {codes.count(200)} served, {codes.count(429)} told to retry")


def stalled_part(bin_path, models):
    # A client that stops reading: it sends a streamed request with a long answer (top-20 logprobs for
    # 2000 tokens, ~1 MB) and reads only its first bytes. A small receive buffer and segment size (the
    # segment size keeps the server's send buffer small too, as over a real network; loopback's 64 KB
    # segments would let it grow to megabytes) stall the server's writes after ~100 KB.
    model = os.path.join(models, "tiny-llama.gguf")
    args = ["-c", "2048", "--max-connections", "1", "--write-timeout", "1", "--idle-timeout", "60"]
    with Server(bin_path, model, *args, key=None) as s:
        host, port = s.url.removeprefix("http://").rsplit(":", 1)
        body = json.dumps({"prompt": "hello", "max_tokens": 2000, "ignore_eos": True, "stream": True, "logprobs": 20, "seed": 1})
        request = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        c.settimeout(30)
        c.connect((host, int(port)))
        c.sendall(request)
        # Its answer has begun: its request is under way, so it is not idle and shedding cannot take
        # the only slot; from here only the write deadline can free it (the idle one is a minute away).
        assert c.recv(12) == b"HTTP/1.1 200", "the request was not answered"
        start = time.time()
        status, _, _ = s.http("GET", "/health", auth=False)
        waited = time.time() - start
        assert status == 200 and waited < 20, (status, waited)
        # So the server closed it, before its answer's end (a reset: what it had not sent is dropped).
        got = b""
        try:
            while chunk := c.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        assert b"[DONE]" not in got, "the client got its whole answer"
        c.close()
        deadline = time.time() + 5
        while (m := s.metrics())["ccsm_requests_running"] > 0 and time.time() < deadline:
            time.sleep(0.01)
        assert m["ccsm_requests_running"] == 0, m
        print(f"stalled: a client that stopped reading held the only slot until the write deadline; /health waited {waited:.1f} s")


def layouts_part(bin_path, models):
    model = os.path.join(models, "tiny-llama.gguf")
    prompt = "The quick brown fox"
    layout = ["--kv-layout", "0:q8_0/q4_0,*:iq4_nl/q5_1"]
    with Server(bin_path, model, "-c", "256", "--parallel", "1", *layout) as s:
        text = s.client().completions.create(model="any", prompt=prompt, max_tokens=10, temperature=0).choices[0].text
        assert text == cli_text(bin_path, model, prompt, 10, extra=["-c", "256", *layout]), text
        # One 256-cell session of this layout, exactly (rows of 64 elements, 2 layers), and one more for
        # cached prefixes: the default budget.
        per_cell = 2 * 34 + 2 * 18 + 2 * 18 + 2 * 24
        assert s.metrics()["ccsm_kv_cache_budget_bytes"] == 2 * 256 * per_cell
    # A recent window: sessions answer as the CLI with the same window, and the rings are in the budget.
    window = ["--kv-quant", "q4_0", "--kv-recent", "16"]
    with Server(bin_path, model, "-c", "256", "--parallel", "1", *window) as s:
        text = s.client().completions.create(model="any", prompt=prompt, max_tokens=10, temperature=0).choices[0].text
        assert text == cli_text(bin_path, model, prompt, 10, extra=["-c", "256", *window]), text
        # q4_0 rows (18 bytes per 32 elements) of 2 layers' K and V, and 16 f16 rows of each.
        assert s.metrics()["ccsm_kv_cache_budget_bytes"] == 256 * 4 * 2 * 18 + 16 * 4 * 64 * 2
    with tempfile.TemporaryDirectory() as d:
        profile = os.path.join(d, "profile.json")
        readme = os.path.join(os.path.dirname(models), "README.md")
        subprocess.run([bin_path, "calibrate", model, "-f", readme, "-c", "64", "--chunks", "2", "-o", profile, "-q"], check=True)
        plan = ["--kv-plan", "auto", "--kv-profile", profile, "--kv-bits", "6"]
        with Server(bin_path, model, "-c", "256", *plan) as s:
            text = s.client().completions.create(model="any", prompt=prompt, max_tokens=10, temperature=0).choices[0].text
            assert text == cli_text(bin_path, model, prompt, 10, extra=["-c", "256", *plan]), text
    # SmolLM2 at 256 cells: an f16 session is 5.625 MiB, so a 10 MiB budget holds one; the planner's
    # layout at q8_0's bytes (2.99 MiB) lets two run at once. The profile is the committed one.
    smol = os.path.join(models, "SmolLM2-135M-Instruct.Q4_1.gguf")
    profile = os.path.join(os.path.dirname(models), "profiles", "SmolLM2-135M-Instruct.kv-profile.json")
    with Server(bin_path, smol, "-c", "256", "--parallel", "2", "--max-memory-mb", "10", "--kv-plan", "auto", "--kv-profile", profile) as s:
        results = []
        ask = lambda: results.append(s.client().completions.create(model="any", prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}))
        threads = [threading.Thread(target=ask) for _ in range(2)]
        [t.start() for t in threads]
        peak_running, peak_bytes = 0, 0
        while any(t.is_alive() for t in threads):
            m = s.metrics()
            peak_running, peak_bytes = max(peak_running, m["ccsm_requests_running"]), max(peak_bytes, m["ccsm_kv_cache_bytes"])
            time.sleep(0.005)
        assert len(results) == 2 and peak_running == 2, (len(results), peak_running)
        assert peak_bytes <= 10 << 20, peak_bytes
    print(f"layouts: sessions equal the CLI; two planned sessions in a budget of one f16 session (peak {peak_bytes / (1 << 20):.2f} MiB)")


if __name__ == "__main__":
    bin_path, models, part = sys.argv[1:4]
    parts = {"text": text_part, "speech": speech_part, "queue": queue_part, "layouts": layouts_part, "stalled": stalled_part}
    parts[part](bin_path, models)
    print(f"{part}: ok")
