// HuViDPO rating page. Plain JavaScript, no build step.
// Every piece of data goes into the page through textContent (never innerHTML), and every request
// carries the bearer token the rater typed in (sessionStorage), video downloads included. The rater id
// is the token's name (GET /v1/whoami), shown read-only; only a server running open in dev mode (no
// token at all) lets the rater type one.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const store = {
    get: (k) => { try { return localStorage.getItem("huvidpo." + k) || ""; } catch (e) { return ""; } },
    set: (k, v) => { try { localStorage.setItem("huvidpo." + k, v); } catch (e) { /* private mode */ } },
  };
  const state = {
    token: sessionStorage.getItem("huvidpo.token") || "",
    rater: store.get("rater"),
    identity: null, // {name, scopes, anonymous} of the signed-in token
    dataset: "",
    version: "",
    mode: store.get("mode") === "ab" ? "ab" : "absolute",
    session: null,
    absIndex: 0,
    abIndex: 0,
    blobs: new Map(), // version/file -> object URL (a small LRU)
    pendingOne: null, // timer: "1" pressed, waiting for "0" (score 10)
    busy: false,
    checkpoints: new Map(), // id -> checkpoint with samples (the samples panel)
  };
  const MAX_BLOBS = 24;

  function setStatus(text, kind) {
    const el = $("status");
    el.textContent = text || "";
    el.className = kind || "";
  }

  function seg(s) { return encodeURIComponent(s); }
  function filePath(f) { return f.split("/").map(seg).join("/"); }

  async function api(path, opts) {
    opts = opts || {};
    const headers = { Authorization: "Bearer " + state.token, Accept: "application/json" };
    let body;
    if (opts.json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(opts.json);
    }
    const res = await fetch(path, { method: opts.method || "GET", headers, body, cache: "no-store" });
    if (!res.ok) {
      let detail = res.statusText;
      try { const p = await res.json(); if (p && p.detail) detail = p.detail; } catch (e) { /* not JSON */ }
      if (res.status === 401) signOut();
      throw new Error(res.status + ": " + detail);
    }
    return opts.raw ? res : res.json();
  }

  // ------------------------------------------------------------------------------------ sign in
  function showSignedIn(on) {
    $("setup").hidden = !on;
    $("signout-btn").hidden = !on;
    $("signin-btn").hidden = on;
    $("token").hidden = on;
    $("token").parentElement.hidden = on;
    if (!on) $("main").hidden = true;
  }

  function signOut() {
    state.token = "";
    state.identity = null;
    samplesLoaded = false;
    $("samples-panel").hidden = true;
    $("samples-panel").open = false;
    sessionStorage.removeItem("huvidpo.token");
    showSignedIn(false);
    setStatus("Signed out: enter an API token to continue.", "error");
  }

  async function signIn() {
    const t = $("token").value.trim();
    if (!t) { setStatus("Enter the API token you were given.", "error"); return; }
    state.token = t;
    sessionStorage.setItem("huvidpo.token", t);
    $("token").value = "";
    await start();
  }

  async function start() {
    try {
      state.identity = await api("/v1/whoami");
      const box = $("rater");
      box.readOnly = !state.identity.anonymous;
      if (!state.identity.anonymous) {
        box.value = state.identity.name;
        box.title = "your rater id is the name of your token";
      }
      const list = await api("/v1/datasets?page_size=200");
      showSignedIn(true);
      $("samples-panel").hidden = !canRead();
      fillDatasets(list.items);
      if (!list.items.length) { setStatus("No dataset yet: upload one through the API first."); return; }
      await chooseDataset(false);
    } catch (e) {
      setStatus("Could not sign in: " + e.message, "error");
    }
  }

  function option(value, text) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = text;
    return o;
  }

  function fillDatasets(items) {
    const sel = $("dataset");
    sel.replaceChildren(...items.map((d) => option(d.name, d.name)));
    const remembered = store.get("dataset");
    if (items.some((d) => d.name === remembered)) sel.value = remembered;
  }

  async function chooseDataset(userPicked) {
    state.dataset = $("dataset").value;
    store.set("dataset", state.dataset);
    const versions = (await api("/v1/datasets/" + seg(state.dataset) + "/versions")).items;
    const sel = $("version");
    sel.replaceChildren(...versions.slice().reverse().map((v) => {
      const kind = v.source && v.source.ratings ? " · compiled from ratings" : "";
      return option(v.id, v.id.slice(0, 12) + " · " + v.videos + " videos · " + v.created_at + kind);
    }));
    const remembered = store.get("version." + state.dataset);
    if (!userPicked && versions.some((v) => v.id === remembered)) sel.value = remembered;
    if (!versions.length) { setStatus("This dataset has no version yet."); $("main").hidden = true; return; }
    await chooseVersion();
  }

  async function chooseVersion() {
    state.version = $("version").value;
    store.set("version." + state.dataset, state.version);
    await loadSession();
  }

  // ------------------------------------------------------------------------------------ session
  async function loadSession() {
    const named = state.identity && !state.identity.anonymous;
    const rater = named ? state.identity.name : $("rater").value.trim();
    if (!rater) {
      $("main").hidden = true;
      setStatus("Enter your rater id (it is remembered on this computer).", "error");
      $("rater").focus();
      return;
    }
    state.rater = rater;
    if (!named) store.set("rater", rater);
    const q = (named ? "?" : "?rater_id=" + seg(rater) + "&") + "version=" + seg(state.version);
    try {
      state.session = await api("/v1/datasets/" + seg(state.dataset) + "/rating-session" + q);
      // the pairs come in pages; resume.ab indexes all of them
      for (let page = state.session; page.next_page_token; ) {
        page = await api("/v1/datasets/" + seg(state.dataset) + "/rating-session" + q +
          "&page_token=" + seg(page.next_page_token));
        state.session.pairs = state.session.pairs.concat(page.pairs);
      }
    } catch (e) {
      setStatus("Could not load the ratings: " + e.message, "error");
      return;
    }
    state.absIndex = state.session.resume.absolute;
    state.abIndex = state.session.resume.ab;
    $("main").hidden = false;
    loadRound();
    const done = state.session.progress[state.mode === "ab" ? "ab" : "absolute"].done;
    setStatus(done ? "Welcome back, " + rater + ": resuming where you stopped." : "Ready, " + rater + ".");
    render();
  }

  function setMode(mode) {
    state.mode = mode;
    store.set("mode", mode);
    render();
  }

  function render() {
    const s = state.session;
    $("tab-absolute").setAttribute("aria-selected", String(state.mode === "absolute"));
    $("tab-ab").setAttribute("aria-selected", String(state.mode === "ab"));
    if (!s) return;
    $("absolute").hidden = state.mode !== "absolute";
    $("ab").hidden = state.mode !== "ab";
    if (state.mode === "absolute") renderAbsolute(); else renderAB();
    document.body.dataset.ready = "1";
  }

  function renderProgress(done, total, noun, position) {
    $("progress").textContent = done + " of " + total + " " + noun;
    $("progress-bar").max = Math.max(total, 1);
    $("progress-bar").value = done;
    $("position").textContent = position;
  }

  // ------------------------------------------------------------------------------------ videos
  async function videoURL(file) {
    const key = state.dataset + "/" + state.version + "/" + file;
    if (state.blobs.has(key)) {
      const url = state.blobs.get(key);
      state.blobs.delete(key);
      state.blobs.set(key, url); // most recently used last
      return url;
    }
    const path = "/v1/datasets/" + seg(state.dataset) + "/versions/" + seg(state.version) + "/files/" + filePath(file);
    const res = await api(path, { raw: true });
    const url = URL.createObjectURL(await res.blob());
    state.blobs.set(key, url);
    while (state.blobs.size > MAX_BLOBS) {
      const [oldKey, oldUrl] = state.blobs.entries().next().value;
      state.blobs.delete(oldKey);
      URL.revokeObjectURL(oldUrl);
    }
    return url;
  }

  async function showVideo(el, file, id) {
    if (el.dataset.videoId === id && el.dataset.version === state.version) return;
    el.dataset.videoId = "";
    try {
      el.src = await videoURL(file);
      el.dataset.videoId = id;
      el.dataset.version = state.version;
    } catch (e) {
      setStatus("Could not load video " + id + ": " + e.message, "error");
    }
  }

  function prefetch(files) {
    for (const f of files) videoURL(f).catch(() => { /* shown when it is needed */ });
  }

  // ------------------------------------------------------------------------------------ scores
  function buildScoreButtons() {
    const box = $("score-buttons");
    for (let n = 0; n <= 10; n++) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = String(n);
      b.dataset.score = String(n);
      b.addEventListener("click", () => rate(n));
      box.appendChild(b);
    }
  }

  function renderAbsolute() {
    const s = state.session;
    const items = s.videos;
    const p = s.progress.absolute;
    if (!items.length) { renderProgress(0, 0, "rated", ""); return; }
    state.absIndex = Math.min(Math.max(state.absIndex, 0), items.length - 1);
    const it = items[state.absIndex];
    renderProgress(p.done, p.total, "rated", "Video " + (state.absIndex + 1) + " of " + items.length);
    $("abs-prompt").textContent = it.prompt;
    $("abs-video-id").textContent = it.id;
    $("abs-current").textContent = it.score === null ? "not rated" : formatScore(it.score);
    for (const b of $("score-buttons").children) {
      b.classList.toggle("chosen", it.score !== null && Number(b.dataset.score) === it.score);
    }
    const v = $("abs-video");
    showVideo(v, it.file, it.id).then(() => v.play().catch(() => {}));
    prefetch(items.slice(state.absIndex + 1, state.absIndex + 3).map((x) => x.file));
  }

  function formatScore(x) { return Number.isInteger(x) ? String(x) : x.toFixed(1); }

  // Judgments are shown at once and saved in the background, one request after another in the order
  // they were given, so a rater can type ahead; a failed save is undone on the page and reported.
  let saving = Promise.resolve();
  let pending = 0;
  function queueSave(request, onSaved, onFailed) {
    pending += 1;
    document.body.dataset.saving = String(pending);
    saving = saving
      .then(request)
      .then(onSaved, (e) => { onFailed(); setStatus("Not saved: " + e.message, "error"); render(); })
      .finally(() => { pending -= 1; document.body.dataset.saving = String(pending); });
    return saving;
  }

  function rate(score) {
    const s = state.session;
    if (!s || state.mode !== "absolute" || !s.videos.length) return Promise.resolve();
    const index = state.absIndex;
    const it = s.videos[index];
    const before = { score: it.score, time: it.time };
    if (it.score === null) s.progress.absolute.done += 1;
    it.score = score;
    it.time = new Date().toISOString();
    if ($("auto-advance").checked && index < s.videos.length - 1) state.absIndex += 1;
    render();
    const body = { version: state.version, rater_id: state.rater, video_id: it.id, score };
    const url = "/v1/datasets/" + seg(state.dataset) + "/ratings/score";
    return queueSave(
      () => api(url, { method: "PUT", json: body }),
      (stored) => setStatus("Saved: " + it.id + " = " + formatScore(stored.record.score) + "."),
      () => {
        if (before.score === null) s.progress.absolute.done -= 1;
        it.score = before.score;
        it.time = before.time;
      },
    );
  }

  // ------------------------------------------------------------------------------------ A/B
  const L = () => $("ab-left");
  const R = () => $("ab-right");

  function renderAB() {
    const s = state.session;
    const pairs = s.pairs;
    const p = s.progress.ab;
    if (!pairs.length) {
      renderProgress(0, 0, "pairs judged", "");
      $("ab-prompt").textContent = "This version has no two videos of one prompt to compare.";
      return;
    }
    state.abIndex = Math.min(Math.max(state.abIndex, 0), pairs.length - 1);
    const pr = pairs[state.abIndex];
    renderProgress(p.done, p.total, "pairs judged", "Pair " + (state.abIndex + 1) + " of " + pairs.length);
    $("ab-prompt").textContent = pr.prompt;
    $("ab-kind").textContent = pr.on_policy
      ? "checkpoint vs previous checkpoint, same first frame" + (pr.first_frame ? " (" + pr.first_frame + ")" : "") + ", sides hidden"
      : "two clips of the same prompt";
    $("ab-current").textContent = pr.choice === null ? "none yet" : pr.choice === "tie" ? "tie" : pr.choice + " is better";
    $("ab-choose-left").classList.toggle("chosen", pr.choice === "left");
    $("ab-choose-right").classList.toggle("chosen", pr.choice === "right");
    $("ab-choose-tie").classList.toggle("chosen", pr.choice === "tie");
    Promise.all([showVideo(L(), pr.left.file, pr.left.id), showVideo(R(), pr.right.file, pr.right.id)]).then(() => {
      restartBoth();
    });
    const next = pairs.slice(state.abIndex + 1, state.abIndex + 2);
    prefetch(next.flatMap((x) => [x.left.file, x.right.file]));
  }

  function choose(winner) {
    const s = state.session;
    if (!s || state.mode !== "ab" || !s.pairs.length) return Promise.resolve();
    const index = state.abIndex;
    const pr = s.pairs[index];
    const before = { choice: pr.choice, time: pr.time };
    if (pr.choice === null) s.progress.ab.done += 1;
    pr.choice = winner;
    pr.time = new Date().toISOString();
    if (index < s.pairs.length - 1) state.abIndex += 1;
    render();
    const body = { version: state.version, rater_id: state.rater, left: pr.left.id, right: pr.right.id, winner };
    const url = "/v1/datasets/" + seg(state.dataset) + "/ratings/choice";
    return queueSave(
      () => api(url, { method: "PUT", json: body }),
      () => {
        setStatus("Saved: " + (winner === "tie" ? "tie" : winner + " is better") + ".");
        loadRound();
      },
      () => {
        if (before.choice === null) s.progress.ab.done -= 1;
        pr.choice = before.choice;
        pr.time = before.time;
      },
    );
  }

  // A/B round results (GET .../preference): shown only once the round is complete, i.e. every pair
  // judged by every rater of the round; while anyone is still judging, only the progress is shown.
  function pct(x) { return (100 * x).toFixed(0) + "%"; }

  async function loadRound() {
    const box = $("round");
    let r;
    try {
      r = await api("/v1/datasets/" + seg(state.dataset) + "/versions/" + seg(state.version) + "/preference");
    } catch (e) {
      box.hidden = true; // not a round of two or more checkpoints (404), or not readable
      return;
    }
    box.hidden = false;
    const summary = r.complete ? r.summary : null;
    $("round-table").hidden = !summary;
    $("round-ranking").hidden = !(summary && summary.ranking);
    if (!summary) {
      $("round-state").textContent = "Round in progress: " + r.progress.done + " of " + r.progress.total +
        " judgments by " + r.raters.length + " rater(s). Results appear once every rater has judged every pair.";
      return;
    }
    $("round-state").textContent = "Round complete: " + r.pairs + " pairs judged by " + r.raters.length +
      " rater(s); a tie counts as half a win.";
    const rows = $("round-rows");
    rows.replaceChildren();
    for (const t of summary.comparisons) {
      const tr = document.createElement("tr");
      const interval = pct(t.win_rate) + " (" + pct(t.wilson_low) + "–" + pct(t.wilson_high) + ")";
      for (const v of [t.checkpoint, t.opponent, t.wins, t.ties, t.losses, interval]) {
        const td = document.createElement("td");
        td.textContent = String(v);
        tr.appendChild(td);
      }
      rows.appendChild(tr);
    }
    const ranking = $("round-ranking");
    ranking.replaceChildren();
    for (const x of summary.ranking || []) {
      const li = document.createElement("li");
      li.textContent = x.checkpoint + " (Bradley–Terry strength " + x.strength.toFixed(3) + ")";
      ranking.appendChild(li);
    }
  }

  // Synced playback: one transport for both clips; drift is corrected on every time update.
  function bothPlaying() { return !L().paused || !R().paused; }
  function playBoth() {
    L().play().catch(() => {});
    R().play().catch(() => {});
    $("ab-play").textContent = "Pause (space)";
  }
  function pauseBoth() {
    L().pause();
    R().pause();
    $("ab-play").textContent = "Play (space)";
  }
  function seekBoth(t) {
    for (const v of [L(), R()]) {
      if (Number.isFinite(v.duration)) v.currentTime = Math.min(t, v.duration);
    }
  }
  function longest() { return Math.max(L().duration || 0, R().duration || 0); }
  function restartBoth() { seekBoth(0); playBoth(); }

  function wireSync() {
    for (const [a, b] of [[L(), R()], [R(), L()]]) {
      a.addEventListener("ended", () => { if (b.ended || b.paused) restartBoth(); });
      a.addEventListener("click", () => (bothPlaying() ? pauseBoth() : playBoth()));
    }
    L().addEventListener("timeupdate", () => {
      const l = L();
      const r = R();
      if (!l.paused && !r.paused && !r.seeking && l.currentTime < (r.duration || 0) && Math.abs(l.currentTime - r.currentTime) > 0.1) {
        r.currentTime = l.currentTime;
      }
      const d = longest();
      if (d > 0) $("ab-seek").value = String(Math.round((1000 * Math.max(l.currentTime, r.currentTime)) / d));
    });
    $("ab-seek").addEventListener("input", () => {
      pauseBoth();
      seekBoth((Number($("ab-seek").value) / 1000) * longest());
    });
    $("ab-play").addEventListener("click", () => (bothPlaying() ? pauseBoth() : playBoth()));
  }

  // ------------------------------------------------------------------------------------ navigation
  function move(delta) {
    if (!state.session) return;
    if (state.mode === "absolute") state.absIndex += delta; else state.abIndex += delta;
    render();
  }

  function togglePlay() {
    if (state.mode === "ab") { bothPlaying() ? pauseBoth() : playBoth(); return; }
    const v = $("abs-video");
    if (v.paused) v.play().catch(() => {}); else v.pause();
  }

  function restart() {
    if (state.mode === "ab") { restartBoth(); return; }
    const v = $("abs-video");
    v.currentTime = 0;
    v.play().catch(() => {});
  }

  function onKey(ev) {
    const tag = ev.target && ev.target.tagName;
    if (tag === "INPUT" && ev.target.type !== "range" || tag === "SELECT" || tag === "TEXTAREA") return;
    if (ev.ctrlKey || ev.metaKey || ev.altKey || !state.session || $("main").hidden) return;
    const k = ev.key;
    let handled = true;
    if (k === "n") move(1);
    else if (k === "p") move(-1);
    else if (k === " ") togglePlay();
    else if (k === "r") restart();
    else if (state.mode === "absolute" && /^[0-9]$/.test(k)) digit(Number(k));
    else if (state.mode === "ab" && (k === "ArrowLeft" || k === "a")) choose("left");
    else if (state.mode === "ab" && (k === "ArrowRight" || k === "l")) choose("right");
    else if (state.mode === "ab" && (k === "ArrowDown" || k === "t")) choose("tie");
    else handled = false;
    if (handled) ev.preventDefault();
  }

  function digit(n) {
    if (state.pendingOne !== null) {
      clearTimeout(state.pendingOne);
      state.pendingOne = null;
      if (n === 0) { rate(10); return; }
      rate(1); // "1" then another digit: two scores, one after the other
    }
    if (n === 1) {
      state.pendingOne = setTimeout(() => { state.pendingOne = null; rate(1); }, 500);
      return;
    }
    rate(n);
  }

  // ------------------------------------------------------------------------------------ compile
  async function compile() {
    $("compile-result").textContent = "compiling…";
    try {
      await saving; // every judgment given so far is stored first
      const r = await api("/v1/datasets/" + seg(state.dataset) + "/ratings/compile", {
        method: "POST",
        json: { base: state.version },
      });
      $("compile-result").textContent =
        "new version " + r.version.id.slice(0, 12) + ": " + r.lineage.records.length + " rating records, " +
        r.pairs.pairs + " DPO pairs";
    } catch (e) {
      $("compile-result").textContent = "";
      setStatus("Compile failed: " + e.message, "error");
    }
  }

  // ------------------------------------------------------------------------------------ checkpoint samples
  // A small panel for tokens that may read checkpoints: the sample videos of one checkpoint at a time.
  let samplesLoaded = false;

  function canRead() {
    const s = (state.identity && state.identity.scopes) || [];
    return s.includes("read") || s.includes("admin");
  }

  async function loadCheckpoints() {
    samplesLoaded = true;
    try {
      const list = await api("/v1/checkpoints?page_size=200");
      const withSamples = list.items.filter((c) => c.samples && c.samples.length).reverse(); // newest first
      $("samples-checkpoint").replaceChildren(...withSamples.map((c) =>
        option(c.id, c.id + " · step " + c.step + " · " + c.samples.length + " samples")));
      state.checkpoints = new Map(withSamples.map((c) => [c.id, c]));
      if (!withSamples.length) { $("samples-list").textContent = "No checkpoint has sample videos yet."; return; }
      await showSamples();
    } catch (e) {
      samplesLoaded = false;
      setStatus("Could not list the checkpoints: " + e.message, "error");
    }
  }

  async function showSamples() {
    const c = state.checkpoints.get($("samples-checkpoint").value);
    const box = $("samples-list");
    box.replaceChildren();
    if (!c) return;
    for (const s of c.samples) {
      const fig = document.createElement("figure");
      const v = document.createElement("video");
      v.muted = true; v.loop = true; v.playsInline = true; v.autoplay = true;
      v.dataset.sample = String(s.index);
      const cap = document.createElement("figcaption");
      cap.textContent = "#" + s.index + " · seed " + s.seed + " · " + s.prompt;
      fig.append(v, cap);
      box.appendChild(fig);
      api(s.url, { raw: true })
        .then((res) => res.blob())
        .then((b) => { v.src = URL.createObjectURL(b); v.play().catch(() => {}); })
        .catch((e) => setStatus("Could not load sample " + s.index + ": " + e.message, "error"));
    }
  }

  // ------------------------------------------------------------------------------------ start
  function init() {
    buildScoreButtons();
    wireSync();
    $("rater").value = state.rater;
    $("signin-btn").addEventListener("click", signIn);
    $("token").addEventListener("keydown", (e) => { if (e.key === "Enter") signIn(); });
    $("signout-btn").addEventListener("click", signOut);
    $("dataset").addEventListener("change", () => chooseDataset(true).catch((e) => setStatus(e.message, "error")));
    $("version").addEventListener("change", () => chooseVersion().catch((e) => setStatus(e.message, "error")));
    $("rater").addEventListener("change", loadSession);
    $("tab-absolute").addEventListener("click", () => setMode("absolute"));
    $("tab-ab").addEventListener("click", () => setMode("ab"));
    $("abs-prev").addEventListener("click", () => move(-1));
    $("abs-next").addEventListener("click", () => move(1));
    $("ab-prev").addEventListener("click", () => move(-1));
    $("ab-next").addEventListener("click", () => move(1));
    $("ab-choose-left").addEventListener("click", () => choose("left"));
    $("ab-choose-right").addEventListener("click", () => choose("right"));
    $("ab-choose-tie").addEventListener("click", () => choose("tie"));
    $("compile-btn").addEventListener("click", compile);
    $("samples-panel").addEventListener("toggle", () => { if ($("samples-panel").open && !samplesLoaded) loadCheckpoints(); });
    $("samples-checkpoint").addEventListener("change", showSamples);
    document.addEventListener("keydown", onKey);
    window.addEventListener("beforeunload", (e) => { if (pending > 0) { e.preventDefault(); e.returnValue = ""; } });
    render();
    if (state.token) start(); else { showSignedIn(false); setStatus("Enter the API token to start rating."); }
  }

  init();
})();
