// The search page: plain DOM code over the JSON API (no framework, no build step, nothing fetched
// from elsewhere). Every API error is {"error": {"code", "message"}}; its message is shown as it is.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_COOKIE = "vlp_api_key";
const K_CHOICES = [5, 10, 20, 50, 100];
const indexInfo = {};  // name -> what GET /indexes says of it

function apiKey() {
  const found = document.cookie.split(";").map((c) => c.trim()).find((c) => c.startsWith(KEY_COOKIE + "="));
  return found ? decodeURIComponent(found.slice(KEY_COOKIE.length + 1)) : "";
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers["X-API-Key"] = apiKey();
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401) $("key-form").hidden = false;
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function fillSelectors(info) {
  const index = $("index");
  index.replaceChildren();
  for (const item of info.indexes) {
    indexInfo[item.name] = item;
    const option = document.createElement("option");
    option.value = item.name;
    const what = item.modality === "text" ? "captions" : "images";
    option.textContent = `${item.name} (${item.size} ${what}, ${item.kind})`;
    index.append(option);
  }
  const k = $("k");
  k.replaceChildren();
  const choices = K_CHOICES.filter((n) => n <= info.limits.max_k);
  if (!choices.length) choices.push(info.limits.max_k);
  for (const n of choices) {
    const option = document.createElement("option");
    option.value = option.textContent = String(n);
    k.append(option);
  }
  k.value = choices.includes(20) ? "20" : String(choices[choices.length - 1]);
  showRerank();
}

function showRerank() {
  const item = indexInfo[$("index").value];
  $("rerank-label").hidden = !(item && item.rerank);
}

// ITM re-ranking scores image-text pairs: text queries over images, image queries over captions.
function rerankFor(queryKind) {
  const item = indexInfo[$("index").value];
  if (!item || !item.rerank || !$("rerank").checked) return null;
  return (queryKind === "text") === (item.modality === "image") ? Number($("k").value) : null;
}

function renderHits(result, label) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of result.hits) {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.id = hit.id;
    card.title = "search by this image";
    if (hit.image_url) {
      const img = document.createElement("img");
      img.src = hit.image_url;
      img.alt = hit.caption;
      img.loading = "lazy";
      card.append(img);
      card.addEventListener("click", () => searchByImageUrl(hit.image_url, hit.caption));
    } else {
      const none = document.createElement("div");
      none.className = "noimage";
      none.textContent = "(no image file)";
      card.append(none);
    }
    const caption = document.createElement("figcaption");
    caption.className = "caption";
    caption.textContent = hit.caption;
    const score = document.createElement("div");
    score.className = "score";
    let text = `#${hit.rank} · score ${hit.score.toFixed(3)}`;
    if (hit.itm_score !== undefined && hit.itm_score !== null) text += ` · itm ${hit.itm_score.toFixed(3)}`;
    score.textContent = text;
    card.append(caption, score);
    grid.append(card);
  }
  setStatus(`${result.hits.length} results for ${label} in ${result.index} (${result.took_ms} ms)`);
}

async function searchText(text) {
  if (!text.trim()) { setStatus("type something to search for", true); return; }
  setStatus("searching...");
  try {
    const body = { text, k: Number($("k").value), index: $("index").value };
    if (rerankFor("text")) body.rerank = rerankFor("text");
    const result = await api("/search", { method: "POST", headers: { "Content-Type": "application/json" },
                                          body: JSON.stringify(body) });
    renderHits(result, `"${text}"`);
  } catch (e) { setStatus(e.message, true); }
}

async function searchImage(file, label) {
  setStatus("searching...");
  const form = new FormData();
  form.append("image", file, file.name || "image");
  form.append("k", $("k").value);
  form.append("index", $("index").value);
  if (rerankFor("image")) form.append("rerank", String(rerankFor("image")));
  try {
    renderHits(await api("/search", { method: "POST", body: form }), label);
  } catch (e) { setStatus(e.message, true); }
}

async function searchByImageUrl(url, caption) {
  try {
    const headers = apiKey() ? { "X-API-Key": apiKey() } : {};
    const response = await fetch(url, { headers });
    if (!response.ok) throw new Error(`cannot read ${url} (HTTP ${response.status})`);
    const blob = await response.blob();
    const name = url.split("/").pop() + "." + (blob.type.split("/")[1] || "png");
    await searchImage(new File([blob], name, { type: blob.type }), `the image of "${caption}"`);
  } catch (e) { setStatus(e.message, true); }
}

async function start() {
  $("index").addEventListener("change", showRerank);
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); searchText($("query").value); });
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) searchImage(file, `"${file.name}"`);
    $("file").value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) searchImage(file, `"${file.name}"`);
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    // SameSite=Strict: other sites' pages cannot send it; it lets <img> requests carry the key.
    document.cookie = `${KEY_COOKIE}=${encodeURIComponent($("api-key").value)}; path=/; SameSite=Strict`;
    $("key-form").hidden = true;
    loadIndexes();
  });
  try {
    const health = await api("/health");
    if (health.api_key_required && !apiKey()) {
      $("key-form").hidden = false;
      setStatus("this server needs its API key");
      return;
    }
  } catch (e) { setStatus(e.message, true); return; }
  await loadIndexes();
}

async function loadIndexes() {
  try {
    fillSelectors(await api("/indexes"));
    setStatus("ready");
    document.body.dataset.ready = "1";
  } catch (e) { setStatus(e.message, true); }
}

start();
