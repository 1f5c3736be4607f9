// The dashboard's only script: live fragments and the job console.
//
// - An element with `data-live="<url>"` is refreshed from that URL (an HTML fragment rendered
//   by the server) twice a second, so a state change shows within a second.
// - `#console` runs xterm.js on the executor's console WebSocket. The session cookie
//   authenticates it; the server decides whether keystrokes are taken (`data-writable` only
//   says whether to send them).
"use strict";

(function () {
  const POLL_MS = 500;

  for (const el of document.querySelectorAll("[data-live]")) {
    let busy = false;
    let last = el.innerHTML;
    const refresh = async () => {
      if (busy) return;
      busy = true;
      try {
        const r = await fetch(el.dataset.live, { credentials: "same-origin", cache: "no-store" });
        if (r.status === 401) {
          window.location.assign("/ui/login");
          return;
        }
        if (r.ok) {
          const text = await r.text();
          if (text !== last) {
            el.innerHTML = text;
            last = text;
          }
          document.body.dataset.stale = "false";
        } else {
          document.body.dataset.stale = "true";
        }
      } catch (_) {
        document.body.dataset.stale = "true";
      } finally {
        busy = false;
      }
    };
    setInterval(refresh, POLL_MS);
  }

  const box = document.getElementById("console");
  if (box && window.Terminal) {
    const status = document.getElementById("console-status");
    const writable = box.dataset.writable === "true";
    const term = new window.Terminal({
      convertEol: true,
      scrollback: 20000,
      disableStdin: !writable,
      fontSize: 13,
    });
    term.open(box);
    let received = 0;
    const proto = window.location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(proto + "//" + window.location.host + box.dataset.ws);
    ws.binaryType = "arraybuffer";
    const say = (text) => { if (status) status.textContent = text; };
    ws.onopen = () => say(writable ? "connected: keystrokes go to the machine" : "connected (read-only)");
    ws.onmessage = (e) => {
      if (typeof e.data === "string") {
        try {
          const m = JSON.parse(e.data);
          say(m.error ? m.error : "job finished: " + m.status);
        } catch (_) {
          say(e.data);
        }
        return;
      }
      const bytes = new Uint8Array(e.data);
      received += bytes.length;
      box.dataset.bytes = String(received);
      term.write(bytes);
    };
    ws.onclose = (e) => { if (!status || !status.textContent.startsWith("job finished")) say("disconnected" + (e.reason ? ": " + e.reason : "")); };
    ws.onerror = () => say("the console connection failed");
    const enc = new TextEncoder();
    term.onData((d) => { if (writable && ws.readyState === WebSocket.OPEN) ws.send(enc.encode(d)); });
  }
})();
