// pp1 viewer: status polling, one WebRTC peer (the session, or a watcher), parameters on the data
// channel, reconnection after a restart or a disconnect. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("video");
const state = {
  pc: null, dc: null, id: null, kind: null,  // the current peer
  wanted: null,                               // "session" | "watcher" | null: what to (re)connect
  connecting: false, ready: false, info: null, iceServers: [],
  frames: 0, fpsWindow: [],
};
window.pp1 = state;  // for tests and curious users

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) sessionStorage.setItem("pp1_token", decodeURIComponent(m[1]));
  return $("token").value || sessionStorage.getItem("pp1_token") || "";
}

function log(msg, cls) {
  const line = document.createElement("div");
  line.textContent = new Date().toLocaleTimeString() + " " + msg;
  if (cls) line.className = cls;
  $("log").prepend(line);
  while ($("log").childNodes.length > 200) $("log").lastChild.remove();
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const t = token();
  if (t) headers["Authorization"] = "Bearer " + t;
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401) { $("tokenrow").style.display = ""; }
  return r;
}

function describeError(body) {
  if (!body) return "";
  if (Array.isArray(body.detail)) return body.detail.map((d) => d.field + ": " + d.reason).join("; ");
  return body.detail || body.error || JSON.stringify(body);
}

function fmt(x, digits = 1) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

// -- status -----------------------------------------------------------------------------------------
function showStatus(s) {
  const i = s.info;
  state.info = i;
  $("job").textContent = `pipeline ${i.pipeline} · preset ${i.preset} · ${i.topology === "pp1" ? "PP1: front + TP=" + i.mesh_size : "pure TP=" + i.mesh_size}` +
    ` · ${i.width}×${i.height} @ ${fmt(i.fps)} fps` + (i.paced ? " (paced: the mesh waits for the viewers)" : "");
  const notice = $("notice");
  if (i.reference_weights) {
    notice.style.display = "block";
    notice.textContent = "These are the reference pipeline's random weights: the picture is structured noise by design. " +
      "The stream is working; it is the model that knows nothing.";
  } else notice.style.display = "none";
  const tb = $("ranks").tBodies[0];
  tb.innerHTML = "";
  for (const r of s.front.ranks) {
    const tr = tb.insertRow();
    const err = r.cause ? `${r.cause.reason} (${r.cause.kind}, in ${r.cause.phase})` : (r.last_error || "");
    for (const v of [r.rank, r.role, r.state + (r.phase ? " [" + r.phase + "]" : ""), err]) tr.insertCell().textContent = v;
    tr.cells[2].className = r.state === "serving" ? "ok" : (r.state === "failed" ? "bad" : "warn");
  }
  const t = s.front.timings, c = s.front.counters;
  const rows = [
    ["stream fps (front)", fmt(t.fps)], ["period p50 / p99 ms", fmt(t.period_p50_ms) + " / " + fmt(t.period_p99_ms)],
    ["mesh / decode ms", fmt(t.mesh_ms) + " / " + fmt(t.decode_ms)], ["overlap score", fmt(t.overlap_score, 2)],
    ["PP overhead ms", fmt(t.pp_overhead_ms, 2)], ["time to first frame s", fmt(t.time_to_first_frame_s, 2)],
    ["prompt → first frame s", fmt(t.prompt_to_first_frame_s, 2)],
    ["chunks / stale / retries / cuts", `${c.emitted} / ${c.stale_dropped} / ${c.retries} / ${c.hard_cuts}`],
    ["viewers", String(s.server.viewers.length)], ["frames dropped (server)", String(s.server.frames_dropped)],
    ["frames superseded by cuts (viewers now)", String(s.server.viewers.reduce((n, v) => n + (v.frames_superseded || 0), 0))],
  ];
  const fb = $("figures").tBodies[0];
  fb.innerHTML = "";
  for (const [k, v] of rows) { const tr = fb.insertRow(); tr.insertCell().textContent = k; tr.insertCell().textContent = v; }
  $("session").textContent = s.server.session_state;
  if (s.front.paused !== undefined && s.front.streaming) $("session").textContent += s.front.paused ? " (paused)" : "";
}

async function poll() {
  try {
    // both answers first, then the page in one go: "ready" never shows beside the figures of an older poll
    const [rr, sr] = await Promise.all([fetch("/ready", { cache: "no-store" }),
                                        fetch("/api/v1/status", { cache: "no-store" })]);
    const ready = await rr.json();
    const status = sr.ok ? await sr.json() : null;
    state.ready = rr.status === 200;
    if (status) showStatus(status);
    $("ready").textContent = state.ready ? "ready" : "not ready: " + ready.reason;
    $("ready").className = state.ready ? "ok" : "bad";
    if (state.ready && state.wanted && !state.pc && !state.connecting) connect(state.wanted);
  } catch (e) {
    state.ready = false;
    $("ready").textContent = "server unreachable (restarting?): retrying";
    $("ready").className = "bad";
  }
  updateButtons();
}

// -- the peer ---------------------------------------------------------------------------------------
function updateButtons() {
  const live = !!state.pc;
  $("start").disabled = live || state.connecting;
  $("watch").disabled = live || state.connecting;
  $("stop").disabled = !live && !state.wanted;
  $("send").disabled = !(live && state.kind === "session");
  $("conn").textContent = state.pc ? `${state.kind} ${state.pc.connectionState}` :
    (state.wanted ? `waiting to ${state.wanted === "session" ? "stream" : "watch"} (reconnects when ready)` : "not streaming");
}

function waitGathering(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ms);
  });
}

function prompts() { return [{ text: $("prompt").value.trim() || "a calm sea at dawn", weight: 1.0 }]; }

async function connect(kind) {
  if (state.connecting || state.pc) return;
  state.connecting = true; state.wanted = kind; updateButtons();
  const pc = new RTCPeerConnection({ iceServers: state.iceServers });
  try {
    pc.addTransceiver("video", { direction: "recvonly" });
    const dc = pc.createDataChannel("parameters");
    dc.onmessage = (e) => onNotice(pc, e.data);
    pc.ontrack = (e) => { video.srcObject = e.streams && e.streams[0] ? e.streams[0] : new MediaStream([e.track]); video.play().catch(() => {}); };
    pc.onconnectionstatechange = () => {
      updateButtons();
      if (pc !== state.pc) return;
      if (pc.connectionState === "failed" || pc.connectionState === "closed" || pc.connectionState === "disconnected") {
        log(`connection ${pc.connectionState}: will reconnect when the server is ready`, "warn");
        drop();
      }
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitGathering(pc, 3000);
    const body = { sdp: pc.localDescription.sdp, type: "offer" };
    if (kind === "session") body.initialParameters = { prompts: prompts() };
    const r = await api("POST", kind === "session" ? "/api/v1/webrtc/offer" : "/api/v1/webrtc/watch", body);
    const answer = await r.json().catch(() => null);
    if (!r.ok) {
      pc.close();
      if (kind === "session" && r.status === 409 && answer && answer.error === "busy") {
        log("another session is live: watching it instead", "warn");
        state.connecting = false; state.wanted = "watcher";
        return connect("watcher");
      }
      log(`${kind} refused (${r.status}): ${describeError(answer)}`, "bad");
      if (r.status === 401 || r.status === 422 || r.status === 400) state.wanted = null;  // retrying will not help
      return;
    }
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    state.pc = pc; state.dc = dc; state.id = answer.sessionId; state.kind = kind;
    log(`${kind} ${answer.sessionId.slice(0, 8)} negotiated`, "ok");
  } catch (e) {
    log(`${kind}: ${e}`, "bad");
    try { pc.close(); } catch (_) {}
  } finally {
    state.connecting = false; updateButtons();
  }
}

function onNotice(pc, data) {
  let msg;
  try { msg = JSON.parse(data); } catch (_) { log("unreadable notice: " + data, "bad"); return; }
  if (msg.type === "error") log(`refused: ${describeError(msg)}`, "bad");
  else if (msg.type === "parameters_applied") log("parameters applied: " + JSON.stringify(msg.parameters), "ok");
  else if (msg.type === "stream_ended") {
    const cause = msg.cause ? ` (rank ${msg.cause.rank}, ${msg.cause.phase}: ${msg.cause.reason})` : "";
    log(`stream ended: ${msg.reason}: ${msg.detail || ""}${cause}`, msg.reason === "closed" ? "warn" : "bad");
    if (pc === state.pc) drop();
  } else log("notice: " + data);
}

function drop() {  // forget the peer; poll() reconnects while state.wanted is set
  const pc = state.pc;
  state.pc = null; state.dc = null; state.id = null; state.kind = null;
  if (pc) try { pc.close(); } catch (_) {}
  updateButtons();
}

async function stop() {
  state.wanted = null;
  const id = state.id;
  drop();
  if (id) {
    const r = await api("DELETE", "/api/v1/webrtc/offer/" + id);
    if (!r.ok && r.status !== 404) log(`stop: ${r.status} ${describeError(await r.json().catch(() => null))}`, "bad");
  }
  video.srcObject = null;
  log("stopped");
}

function sendPrompt() {
  if (!state.dc || state.dc.readyState !== "open") { log("no open data channel", "bad"); return; }
  state.dc.send(JSON.stringify({ prompts: prompts() }));
}

// -- the browser's own frame rate ------------------------------------------------------------------------
function countFrames() {
  const tick = (now) => {
    state.frames += 1;
    state.fpsWindow.push(now);
    while (state.fpsWindow.length && now - state.fpsWindow[0] > 2000) state.fpsWindow.shift();
    const w = state.fpsWindow;
    state.browserFps = w.length > 1 ? (w.length - 1) * 1000 / (w[w.length - 1] - w[0]) : null;
    $("bfps").textContent = fmt(state.browserFps);
    video.requestVideoFrameCallback(tick);
  };
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) video.requestVideoFrameCallback(tick);
}

$("start").onclick = () => connect("session");
$("watch").onclick = () => connect("watcher");
$("stop").onclick = stop;
$("send").onclick = sendPrompt;
window.addEventListener("pagehide", () => {
  if (state.id) fetch("/api/v1/webrtc/offer/" + state.id, { method: "DELETE", keepalive: true,
    headers: token() ? { Authorization: "Bearer " + token() } : {} });
});
fetch("/api/v1/webrtc/ice-servers").then((r) => r.json()).then((j) => { state.iceServers = j.iceServers || []; }).catch(() => {});
countFrames();
poll();
setInterval(poll, 1000);
