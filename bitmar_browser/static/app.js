// The memory browser's page script: search (text and/or an uploaded image, time window), live
// statistics and pictures of the memory, and the confirmed "clear memory". Text from the store is
// only ever put into the page with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const fmt = (x, digits) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

function matchText(hit) {
  // How a result was found: which rankings it is in, at which rank, with which score.
  const parts = [];
  if (hit.lexical_rank) parts.push(`words #${hit.lexical_rank} (BM25 ${fmt(hit.lexical_score, 2)})`);
  if (hit.embedding_rank) parts.push(`embedding #${hit.embedding_rank} (cosine ${fmt(hit.embedding_score, 3)})`);
  else if (hit.embedding_score !== null) parts.push(`cosine ${fmt(hit.embedding_score, 3)}`);
  return parts.join(" · ");
}

function resultCard(hit, rank) {
  const img = hit.thumbnail
    ? el("img", { class: "thumb", src: hit.thumbnail, alt: `frame of episode ${hit.id}` })
    : el("span", { class: "thumb none" }, "no image");
  return el("li", { class: "card result", "data-episode-id": hit.id, "data-rank": rank },
    el("a", { href: hit.url }, img),
    el("p", { class: "caption" }, hit.caption),
    el("p", { class: "meta" }, el("time", {}, hit.time), " · ",
      el("span", { class: `source ${hit.source}` }, hit.source),
      hit.robot ? ` · ${hit.robot}` : "", " · ", el("a", { href: hit.url }, `#${hit.id}`)),
    el("p", { class: "score" },
      el("strong", { class: "matched-by" }, hit.matched_by), ` score ${fmt(hit.score, 4)} · `, matchText(hit)));
}

async function runSearch(event) {
  event.preventDefault();
  const params = new URLSearchParams();
  const text = $("search-text").value.trim();
  if (text) params.set("q", text);
  for (const [name, id] of [["start", "search-start"], ["end", "search-end"], ["k", "search-k"]]) {
    if ($(id).value) params.set(name, $(id).value);
  }
  const file = $("search-image").files[0];
  const message = $("search-message");
  const results = $("results");
  if (!text && !file) {
    message.textContent = "Type words or choose an image.";
    return;
  }
  message.textContent = "Searching…";
  const init = file ? { method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" } } : {};
  let body;
  try {
    const response = await fetch(`/api/search?${params}`, init);
    body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
  } catch (err) {
    message.textContent = `Search failed: ${err.message}`;
    results.replaceChildren();
    return;
  }
  message.textContent = body.message;
  results.replaceChildren(...body.hits.map((hit, i) => resultCard(hit, i + 1)));
  document.body.dataset.searched = String(Number(document.body.dataset.searched || 0) + 1);
}

let lastVersion = null;
let firstTotal = null;

async function pollStats() {
  let s;
  try {
    const response = await fetch("/api/stats");
    if (!response.ok) throw new Error(response.statusText);
    s = await response.json();
  } catch (err) {
    $("stat-updated").textContent = `unreachable (${err.message})`;
    return;
  }
  $("stat-episodes").textContent = s.episodes;
  $("stat-writes").textContent = s.memory_writes ?? "–";
  $("stat-slots").textContent = s.effective_slots === null ? "–" : `${fmt(s.effective_slots, 1)} of ${s.slots}`;
  $("stat-slots").title = `usage spread over ${fmt(s.effective_slots, 1)} slots (exp of its entropy); ` +
    `${s.slots_used} slots above ${s.used_slot_usage}`;
  $("stat-newest").textContent = s.newest_time ?? "–";
  $("stat-oldest").textContent = s.oldest_time ?? "–";
  $("stat-updated").textContent = new Date().toLocaleTimeString();
  if (s.slots !== null) {
    $("memory-caption").textContent =
      `memory M: ${s.slots} slots across × ${s.slot_dim ?? "?"} channels down (blue −, white 0, red +)`;
  }
  if (s.version !== lastVersion) {
    lastVersion = s.version;
    for (const id of ["usage-map", "memory-map"]) {
      const img = $(id);
      img.onload = () => { img.hidden = false; };
      img.onerror = () => { img.hidden = true; };
      img.src = `/${id === "usage-map" ? "usage" : "memory"}.png?v=${encodeURIComponent(s.version)}`;
    }
  }
  const cards = document.querySelector("#timeline .cards");
  if (cards) {
    if (firstTotal === null) firstTotal = Number(cards.dataset.total);
    const notice = $("new-episodes");
    const fresh = s.episodes - firstTotal;
    if (fresh !== 0) {
      notice.hidden = false;
      notice.firstChild.textContent = fresh > 0
        ? `${fresh} new episode${fresh === 1 ? "" : "s"} since this page loaded: show them`
        : "the memory changed since this page loaded: reload";
    }
  }
  document.body.dataset.statsVersion = s.version;
}

async function clearMemory() {
  const n = $("stat-episodes").textContent;
  if (!window.confirm(`Forget all ${n} episodes and the memory M? This cannot be undone.\n\n` +
                      "If a node is writing this store, stop it first (or call its ~/clear_memory service).")) return;
  const token = document.querySelector('meta[name="bitmar-token"]').content;
  const response = await fetch("/api/clear", {
    method: "POST", headers: { "Content-Type": "application/json", "X-Bitmar-Token": token },
    body: JSON.stringify({ confirm: true }),
  });
  const body = await response.json();
  if (!response.ok) { window.alert(`Clear failed: ${body.error}`); return; }
  window.location.assign("/");
}

document.addEventListener("DOMContentLoaded", () => {
  const form = $("search-form");
  if (form) {
    form.addEventListener("submit", runSearch);
    form.addEventListener("reset", () => { $("results").replaceChildren(); $("search-message").textContent = ""; });
  }
  const clear = $("clear-memory");
  if (clear) clear.addEventListener("click", clearMemory);
  pollStats();
  setInterval(pollStats, Number(document.body.dataset.pollMs) || 2000);
});
