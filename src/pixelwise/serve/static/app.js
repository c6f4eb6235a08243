// pixelwise serve: the page. Plain script, no libraries, nothing from another host.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,          // GET /api/info, once it has loaded
  image: null,         // the image chosen last: { blob, name, showable }
  truth: null,         // the ground truth: { blob, name, classIds, usedWith: the image it gave metrics for, or null }
  shown: null,         // what the result panel shows: { image, result }
  run: 0,              // the number of the newest request; an answer to an older one is dropped
  controller: null,    // aborts the request in flight when a newer one starts
  optionsSet: false,   // the options were set from the server's once; later loads keep the user's edits
  pending: false,      // an image was chosen before the model info loaded: segment it once it has
  key: sessionStorage.getItem("pixelwise-key"),
};
const UNREACHABLE = "the server cannot be reached (is pixelwise serve still running?)";

function setState(name, message) {
  $("main").dataset.state = name;
  if (message !== undefined) $("status").textContent = message;
}

// a key fetch() can send: header values are Latin-1, without control characters
const badKeyChar = (key) => [...key].find((ch) => !/[\x20-\x7e\xa0-\xff]/.test(ch));

function headers() {
  return state.key && !badKeyChar(state.key) ? { "X-API-Key": state.key } : {};
}

function showKeyPanel(message) {
  $("key-panel").hidden = false;
  $("key-message").textContent = message;
  $("key-input").focus();
}

async function api(path, options = {}) {
  const sentKey = headers()["X-API-Key"];
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error(UNREACHABLE);
  }
  if (response.status === 401) {
    const message = sentKey ? "the server rejected this API key (check it and enter it again above)"
      : "this server needs an API key (enter it above)";
    showKeyPanel(sentKey ? "The server rejected the key you entered. Check it and enter it again."
      : "This server needs an API key. It is kept for this browser tab only.");
    throw new Error(message);
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ") : body.detail;
    } catch (_) { /* not JSON */ }
    const retry = response.headers.get("Retry-After");
    const said = /retry in/i.test(String(detail));
    throw new Error(`${response.status}: ${detail}` + (retry && !said ? ` (retry in ${retry} s)` : ""));
  }
  return response;
}

async function apiJson(path, options = {}) {
  const response = await api(path, options);
  try {
    return await response.json();
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error(`the answer was cut off: ${UNREACHABLE}`);
  }
}

async function apiBlob(path) {
  const response = await api(path);
  try {
    return await response.blob();
  } catch (e) {
    throw new Error(`the answer was cut off: ${UNREACHABLE}`);
  }
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

function swatch(color) {
  const s = el("span", { className: "swatch", title: `rgb(${color.join(", ")})` });
  s.style.backgroundColor = `rgb(${color.join(",")})`;
  return s;
}

function percent(x, digits = 1) {
  return x === null || x === undefined ? "–" : `${(100 * x).toFixed(digits)}%`;
}

function stem(name) {
  return (name || "image").replace(/\.[^.]*$/, "") || "image";
}

// ---------------------------------------------------------------- start: model info and samples

function setInputsEnabled(on) {
  $("image-input").disabled = !on;
  $("options").disabled = !on;
  $("drop").classList.toggle("disabled", !on);
  $("run").disabled = !on || !state.image;
}

async function init() {
  setState("loading", "Loading the model…");
  setInputsEnabled(false);
  let info;
  try {
    info = await apiJson("/api/info");
  } catch (e) {
    setState("error", `Could not load the model: ${e.message}`);
    return;
  }
  state.info = info;
  $("key-panel").hidden = true;
  $("model-name").textContent = `· ${info.model}`;
  $("model-desc").textContent = `${info.task} segmentation, ${info.classes.length} classes; input: ${info.input.description}`;
  document.title = `pixelwise · ${info.model}`;
  const semantic = info.task === "semantic";
  for (const node of document.querySelectorAll(".semantic-only")) node.hidden = !semantic;
  for (const node of document.querySelectorAll(".instance-only")) node.hidden = semantic;
  if (!state.optionsSet) {  // a later load (after the key is entered) keeps what the user changed
    if (semantic) {
      $("tile").value = info.options.tile || 0;
      $("tta").value = info.options.tta || "none";
      $("crf").checked = Boolean(info.options.crf);  // on where the server refines (--crf)
    } else if (info.options.score_thresh !== undefined) {
      $("score-thresh").value = info.options.score_thresh;
    }
    state.optionsSet = true;
  }
  const datasetLabels = (info.truth_formats || {}).dataset;
  $("truth-format-box").hidden = !datasetLabels;
  if (datasetLabels) $("truth-format-dataset").textContent = datasetLabels;
  if (semantic) {
    $("unc-kind").textContent = info.uncertainty === "mc_dropout"
      ? `(Monte-Carlo dropout, ${info.uncertainty_samples} samples)` : "(entropy of the class probabilities)";
  }
  setInputsEnabled(true);
  showSamples(info.samples);
  if (state.pending) segment();  // an image dropped or pasted while the model was loading
  else setState("ready", "Choose an image, drop one, or pick a sample.");
}

function showSamples(samples) {
  const list = $("sample-list");
  list.replaceChildren();
  $("samples").hidden = samples.length === 0;
  for (const sample of samples) {
    let pending = null;  // the image's blob, fetched once (for the thumbnail and the click)
    const load = () => pending || (pending = apiBlob(sample.url).catch((e) => { pending = null; throw e; }));
    const img = el("img", { alt: "" });
    const label = sample.ground_truth_url ? `${sample.name} (with ground truth)` : sample.name;
    const button = el("button", { type: "button", className: "sample", title: label }, [img, el("span", { textContent: label })]);
    load().then((blob) => { img.src = URL.createObjectURL(blob); }, () => button.classList.add("no-thumb"));
    button.addEventListener("click", async () => {
      let blob, truth = null;
      try {
        blob = await load();
        if (sample.ground_truth_url) truth = await apiBlob(sample.ground_truth_url);
      } catch (e) {
        setState("error", `Could not load sample ${sample.name}: ${e.message}`);
        markShown("failed", sample.name);
        return;
      }
      $("image-input").value = "";
      const sampleTruth = truth ? { blob: truth, name: `${sample.name}'s ground truth`, classIds: true } : null;
      chooseImage(blob, sample.name, { truth: sampleTruth });
    });
    list.append(button);
  }
}

// ---------------------------------------------------------------- choosing inputs

// A new image replaces the one being segmented (its request is aborted). A ground truth chosen
// before the image is kept for it; one that already gave metrics for another image is removed.
// Samples bring their own ground truth (or none), which belongs to the sample: it is removed when
// another image is chosen, whether or not the sample's request finished.
function chooseImage(blob, name, { truth } = {}) {
  let note = "";
  if (truth !== undefined) {
    setTruth(truth && truth.blob, truth && truth.name, truth && truth.classIds);
  } else if (state.truth && (state.truth.usedWith || state.truth.classIds)) {
    const { name: old, usedWith } = state.truth;
    const owner = usedWith ? usedWith.name : "the sample";
    note = `The ground truth ${old} was for ${owner}, so it was removed (choose one for ${name} to compare).`;
    setTruth(null);
    $("truth-name").textContent = `removed ${old}: it was for ${owner}`;
  }
  state.image = { blob, name, showable: undefined, note };
  $("run").disabled = !state.info;
  state.pending = !state.info;
  if (!state.info) {
    setState($("main").dataset.state, `The model has not loaded yet: ${name} will be segmented once it has.`);
    return;
  }
  segment();
}

// classIds: a sample's ground truth, which holds class ids whatever the "stored as" choice says
function setTruth(blob, name, classIds = false) {
  state.truth = blob ? { blob, name, classIds, usedWith: null } : null;
  $("truth-name").textContent = blob ? `using ${name}` : "";
  $("truth-clear").hidden = !blob;
  if (!blob) $("truth-input").value = "";
}

function pickFile(file) {
  if (file) chooseImage(file, file.name);
}

function wireInputs() {
  $("image-input").addEventListener("change", (e) => pickFile(e.target.files[0]));
  $("truth-input").addEventListener("change", (e) => {
    const file = e.target.files[0];
    setTruth(file || null, file ? file.name : null);
    // a ground truth added to an image already chosen: segment it again, with the metrics
    if (file && state.image && state.info) segment();
    else if (file) $("truth-name").textContent = `using ${file.name} (with the next image you choose)`;
  });
  $("truth-clear").addEventListener("click", () => {
    setTruth(null);
    $("metrics-panel").hidden = true;  // they were against the ground truth just removed
    $("truth-input").focus();
  });
  $("run").addEventListener("click", () => segment());

  // drops: on the box they choose the image; anywhere else on the page they do nothing (the
  // browser would otherwise open the file and leave the page); a file input takes its own drops
  const drop = $("drop");
  const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
  const ownDrop = (e) => drop.contains(e.target) ||
    (e.target instanceof HTMLInputElement && e.target.type === "file" && !e.target.disabled);
  drop.addEventListener("dragenter", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    if (e.dataTransfer) e.dataTransfer.dropEffect = $("image-input").disabled ? "none" : "copy";
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", (e) => {
    // moving onto the box's own label or input is not leaving it (and dragover sets it back anyway)
    if (!(e.relatedTarget instanceof Node && drop.contains(e.relatedTarget))) drop.classList.remove("over");
  });
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) {
      $("image-input").value = "";
      pickFile(file);
    }
  });
  document.addEventListener("dragover", (e) => {
    if (ownDrop(e)) return;
    e.preventDefault();
    if (e.dataTransfer) e.dataTransfer.dropEffect = "none";
  });
  document.addEventListener("drop", (e) => {
    if (ownDrop(e)) return;
    e.preventDefault();
    drop.classList.remove("over");
    if (hasFiles(e)) $("status").textContent = "To segment a file, drop it on the “Choose an image” box.";
  });

  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) {
      $("image-input").value = "";
      chooseImage(item.getAsFile(), "pasted.png");
    }
  });
  for (const radio of document.querySelectorAll("input[name=view]")) radio.addEventListener("change", showView);
  $("opacity").addEventListener("input", () => {
    $("opacity-value").textContent = `${$("opacity").value}%`;
    $("layer").style.opacity = $("opacity").value / 100;
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key-input").value;
    const bad = badKeyChar(key);
    if (bad) {
      $("key-message").textContent = `This key has a character a browser cannot send in a request header ` +
        `(“${bad}”): only Latin-1 letters, digits and symbols can be sent. Use a key without it.`;
      setState("error", "Could not use the key: it has a character a browser cannot send.");
      $("key-input").focus();
      return;
    }
    state.key = key;
    sessionStorage.setItem("pixelwise-key", key);
    init();
  });
  window.addEventListener("resize", layout);
}

// ---------------------------------------------------------------- predicting

// the options in view are valid (the browser's own checks: whole tile, score in [0, 1])
function optionsValid() {
  for (const id of ["tile", "score-thresh"]) {
    const input = $(id);
    if (input.closest("[hidden]") || input.checkValidity()) continue;
    const label = document.querySelector(`label[for=${id}]`).textContent;
    setState("error", `${label}: ${input.validationMessage || "not a valid value"}`);
    input.focus();
    return false;
  }
  return true;
}

// whether this browser can show the file itself (TIFF, PPM cannot); if not, the server sends the
// decoded image as PNG
async function canShow(blob) {
  const url = URL.createObjectURL(blob);
  try {
    const img = new Image();
    img.src = url;
    await img.decode();
    return img.naturalWidth > 0;
  } catch (_) {
    return false;
  } finally {
    URL.revokeObjectURL(url);
  }
}

// whether the browser may show the file otherwise than the server decodes it, so that the page
// shows the server's decoded image: a GIF, WebP or animated PNG plays its frames (the first is
// segmented), and browsers do not turn a WebP by its EXIF orientation as the server does. Told
// from the file's first bytes, not its type, which the browser guesses from the name (a WebP
// saved as photo.png, a file without an extension).
async function shownOtherwise(blob) {
  const bytes = new Uint8Array(await blob.slice(0, 1 << 16).arrayBuffer());
  const begins = (...signature) => signature.every((b, i) => bytes[i] === b);
  // "latin1" is windows-1252 to a TextDecoder: only its ASCII (the chunk names) is read from the text
  const head = new TextDecoder("latin1").decode(bytes);
  if (begins(0x47, 0x49, 0x46, 0x38) || (begins(0x52, 0x49, 0x46, 0x46) && head.slice(8, 12) === "WEBP")) return true;
  if (!begins(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a)) return false;
  const animation = head.indexOf("acTL"), pixels = head.indexOf("IDAT");
  return animation >= 0 && (pixels < 0 || animation < pixels);  // an APNG's acTL chunk comes before its pixels
}

async function segment() {
  if (!state.image) return;
  if (!state.info) {
    setState($("main").dataset.state, `The model has not loaded yet: ${state.image.name} will be segmented once it has.`);
    return;
  }
  if (!optionsValid()) return;
  state.pending = false;
  if (state.controller) state.controller.abort();  // the newer choice wins
  const controller = new AbortController();
  const run = ++state.run;
  state.controller = controller;
  const image = state.image, task = state.info.task;
  let truth = state.truth;
  setState("busy", `Segmenting ${image.name}…`);
  $("run").disabled = true;
  markShown("busy", image.name);
  try {
    if (image.showable === undefined) image.showable = await canShow(image.blob);
    if (image.serverImage === undefined) image.serverImage = await shownOtherwise(image.blob);
    if (run !== state.run) return;
    if (truth && state.truth !== truth) truth = null;  // removed while the file was read
    const form = new FormData();
    form.append("image", image.blob, image.name);
    if (task === "semantic") {
      form.append("tile", $("tile").value || "0");
      form.append("tta", $("tta").value);
      form.append("crf", $("crf").checked ? "true" : "false");
      form.append("uncertainty", $("uncertainty").checked ? "true" : "false");
      form.append("overlay", "false");  // the page draws its overlay from the mask
    } else if ($("score-thresh").value !== "") {
      form.append("score_thresh", $("score-thresh").value);
    }
    // the decoded image for files the browser cannot show, or may show otherwise (shownOtherwise)
    if (!image.showable || image.serverImage) form.append("return_image", "true");
    if (truth) {
      form.append("ground_truth", truth.blob, truth.name);
      // the samples' ground truths are class ids; an uploaded one is read as the page's choice says
      form.append("truth_format", truth.classIds ? "classes" : $("truth-format").value);
      $("truth-name").textContent = `using ${truth.name}`;
    }
    const result = await apiJson("/api/predict", { method: "POST", body: form, signal: controller.signal });
    if (run !== state.run) return;
    if (truth && state.truth !== truth) delete result.metrics;  // removed while this request ran
    const view = await prepare(result, image);
    if (run !== state.run) return;
    if (view.turned) {  // the browser shows the file turned otherwise (an orientation only in XMP): ask again
      if (view.baseUrl) URL.revokeObjectURL(view.baseUrl);
      image.serverImage = true;
      return await segment();
    }
    commit(view);
    if (truth && result.metrics) truth.usedWith = image;
    const notes = [image.note, view.note].filter(Boolean).join(" ");
    image.note = "";
    setState("done", `Segmented ${image.name}: ${result.width}×${result.height} in ${Math.round(result.ms)} ms.` +
      (notes ? ` ${notes}` : ""));
  } catch (e) {
    if (run !== state.run) return;  // a newer request took over (this one was aborted)
    setState("error", `Could not segment ${image.name}: ${e.message}` + (image.note ? ` ${image.note}` : ""));
    markShown("failed", image.name);
  } finally {
    if (run === state.run) {
      state.controller = null;
      $("run").disabled = !state.image || !state.info;
    }
  }
}

function loadImage(src, alt) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.alt = alt;
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not show the image"));
    img.src = src;
  });
}

// everything the result needs, decoded off screen: nothing on the page changes until commit()
async function prepare(result, image) {
  const png = (b64) => `data:image/png;base64,${b64}`;
  const view = { result, image, note: "" };
  let baseSrc = null;
  if (result.image_png_base64) baseSrc = png(result.image_png_base64);
  else if (image.showable) baseSrc = URL.createObjectURL(image.blob);
  view.baseUrl = baseSrc && baseSrc.startsWith("blob:") ? baseSrc : null;
  try {
    view.base = baseSrc ? await loadImage(baseSrc, "the input image") : null;
  } catch (_) {
    view.base = null;
  }
  // the browser's own picture of another size than the one segmented: turned otherwise than the server turned it
  view.turned = Boolean(view.base && !result.image_png_base64 &&
    (view.base.naturalWidth !== result.width || view.base.naturalHeight !== result.height));
  if (!view.base) view.note = "This browser cannot show this image's format: the overlay is drawn on black.";
  view.mask = await loadImage(png(result.mask_png_base64), "the predicted class mask");
  view.unc = result.uncertainty_png_base64
    ? await loadImage(png(result.uncertainty_png_base64), "the uncertainty map: brighter is less certain") : null;
  const layer = el("canvas", { width: result.width, height: result.height });
  const ctx = layer.getContext("2d");
  if (result.task === "semantic") {
    // the class colours, with the background class (if the model has one) left clear, as predict's overlay does;
    // the mask PNG is indexed and without colour chunks, so its pixels are the palette's colours exactly
    ctx.drawImage(view.mask, 0, 0);
    const background = state.info.classes.find((c) => c.clear);
    if (background) {
      const pixels = ctx.getImageData(0, 0, result.width, result.height);
      const bg = background.color;
      const d = pixels.data;
      for (let i = 0; i < d.length; i += 4) {
        const clear = d[i] === bg[0] && d[i + 1] === bg[1] && d[i + 2] === bg[2];
        d[i + 3] = clear ? 0 : 255;
      }
      ctx.putImageData(pixels, 0, 0);
    }
  } else if (result.overlay_png_base64) {
    // instances: predict's overlay (masks in each instance's colour, boxes, names, scores) faded over the image
    ctx.drawImage(await loadImage(png(result.overlay_png_base64), ""), 0, 0);
  }
  view.layer = layer;
  return view;
}

function swapImage(id, img) {
  const old = $(id);
  img.id = id;
  img.hidden = old.hidden;
  old.replaceWith(img);
}

// show a prepared result at once: the image, the layers, the download and the tables all belong to it
function commit(view) {
  const { result, image } = view;
  if (state.shown && state.shown.baseUrl) URL.revokeObjectURL(state.shown.baseUrl);
  state.shown = { image, result, baseUrl: view.baseUrl };
  swapImage("base-img", view.base || el("img", { alt: "the input image (this browser cannot show its format)" }));
  $("base-img").classList.toggle("missing", !view.base);
  swapImage("mask-img", view.mask);
  swapImage("unc-img", view.unc || el("img", { alt: "the uncertainty map: brighter is less certain" }));
  const layer = $("layer");
  layer.width = result.width;
  layer.height = result.height;
  layer.getContext("2d").drawImage(view.layer, 0, 0);
  layer.style.opacity = $("opacity").value / 100;
  $("view-uncertainty").disabled = !view.unc;
  if (!view.unc && $("view-uncertainty").checked) $("view-overlay").checked = true;
  $("stage-note").hidden = !view.note;
  $("stage-note").textContent = view.note;
  const download = $("download");
  download.href = `data:image/png;base64,${result.mask_png_base64}`;
  download.download = `${stem(image.name)}_mask.png`;
  $("result-name").textContent = `for ${image.name}`;
  $("result-meta").textContent = `${result.width}×${result.height}, ${Math.round(result.ms)} ms`;
  renderLegend(result.classes, result.task);
  renderInstances(result.instances);
  renderMetrics(result.metrics);
  markShown("current");
  $("result").hidden = false;
  layout();
  showView();
}

// tells the shown result apart from the request under way or failed: the result panel always
// names its own image; while another image is segmented, or after a failure, it is dimmed and says so
function markShown(how, name) {
  const result = $("result"), note = $("result-note");
  if (!state.shown || how === "current") {
    delete result.dataset.stale;
    note.hidden = true;
    return;
  }
  const own = state.shown.image.name;
  const same = state.shown.image === state.image && how === "busy";
  if (same) {  // segmenting the same image again (new options): the result is only about to change
    result.dataset.stale = "updating";
    note.textContent = `Segmenting ${own} again; below is its previous result.`;
  } else if (how === "busy") {
    result.dataset.stale = "old";
    note.textContent = `Segmenting ${name}; below is still the result for ${own}.`;
  } else {
    result.dataset.stale = "old";
    note.textContent = `The request for ${name} failed (see the message above); below is the earlier result for ${own}.`;
  }
  note.hidden = false;
}

// the stage: the image's aspect kept, at most 640 px wide and 70% of the window high; a very thin
// image is shown at least 128 px (or its own size) across and scrolls inside its box
function layout() {
  if (!state.shown) return;
  const { width: w, height: h } = state.shown.result;
  const wrap = $("stage-wrap");
  const avail = Math.max(120, wrap.parentElement.clientWidth - 2);
  const maxW = Math.min(640, avail), maxH = Math.max(160, 0.7 * window.innerHeight);
  let s = Math.min(maxW / w, maxH / h);
  const thin = Math.min(w, h) * s;
  if (thin < 128) s = Math.max(s, Math.min(1, 128 / Math.min(w, h)));
  const stage = $("stage");
  stage.style.setProperty("--w", `${Math.max(1, Math.round(w * s))}px`);
  stage.style.setProperty("--h", `${Math.max(1, Math.round(h * s))}px`);
  const across = w * s > avail + 1, down = h * s > maxH + 1;
  $("stage-hint").hidden = !(across || down);
  $("stage-hint").textContent = across || down ? `The image is shown at ${Math.round(100 * s)}%: scroll ` +
    `${across ? "sideways" : "down"} in its box to see the rest (with the mouse wheel, or the arrow keys once the box has focus).` : "";
}

function showView() {
  const view = document.querySelector("input[name=view]:checked").value;
  $("base-img").hidden = !(view === "overlay" || view === "image");
  $("layer").hidden = view !== "overlay";
  $("mask-img").hidden = view !== "mask";
  $("unc-img").hidden = view !== "uncertainty";
  $("opacity").disabled = view !== "overlay";
}

function renderLegend(classes, task) {
  const semantic = task === "semantic";
  $("legend-h").textContent = semantic ? "Legend" : "Classes";
  $("legend-note").hidden = semantic;
  const present = classes.filter((c) => c.pixels > 0).sort((a, b) => b.pixels - a.pixels);
  $("legend").tBodies[0].replaceChildren(...present.map((c) => el("tr", {}, [
    el("td", {}, [swatch(c.color)]),
    el("td", { textContent: semantic && state.info.classes[c.id]?.clear ? `${c.name} (clear in the overlay)` : c.name }),
    el("td", { textContent: `${percent(c.share)} (${c.pixels.toLocaleString()} px)` }),
  ])));
  const absent = classes.filter((c) => c.pixels === 0).map((c) => c.name);
  $("legend-absent").textContent = absent.length ? `Not found: ${absent.join(", ")}.` : "";
}

function renderInstances(instances) {
  $("instances-panel").hidden = !instances;
  if (!instances) return;
  $("instances").tBodies[0].replaceChildren(...instances.map((d) => el("tr", {}, [
    el("td", {}, d.color ? [swatch(d.color)] : ["–"]),
    el("td", { textContent: d.id }), el("td", { textContent: d.class_name }),
    el("td", { textContent: d.score.toFixed(3) }), el("td", { textContent: d.box.map((v) => v.toFixed(0)).join(", ") }),
    el("td", { textContent: d.area.toLocaleString() }),
  ])));
}

function renderMetrics(metrics) {
  $("metrics-panel").hidden = !metrics;
  if (!metrics) return;
  $("metrics-summary").textContent = `mIoU ${percent(metrics.mIoU)}, Boundary IoU ${percent(metrics.boundary_iou)}, ` +
    `pixel accuracy ${percent(metrics.pixel_acc)}, ` +
    `mean class accuracy ${percent(metrics.mean_acc)}` +
    (metrics.ignored_pixels ? `; ${metrics.ignored_pixels.toLocaleString()} ignored pixels (255) not counted.` : ".");
  const colors = Object.fromEntries(state.info.classes.map((c) => [c.id, c.color]));
  const seen = metrics.per_class.filter((c) => c.iou !== null);
  $("iou").tBodies[0].replaceChildren(...seen.map((c) => el("tr", {}, [
    el("th", { scope: "row" }, [swatch(colors[c.id] || [255, 255, 255]), ` ${c.name}`]),
    el("td", { textContent: percent(c.iou) }), el("td", { textContent: percent(c.boundary_iou) }),
    el("td", { textContent: percent(c.acc) }),
    el("td", { textContent: c.pixels.toLocaleString() }),
  ])));
  // rows and columns of the classes in either mask
  const ids = seen.map((c) => c.id);
  const names = Object.fromEntries(metrics.per_class.map((c) => [c.id, c.name]));
  const head = el("tr", {}, [el("th", { scope: "col", textContent: "truth \\ predicted" }),
    ...ids.map((j) => el("th", { scope: "col", textContent: names[j] }))]);
  const rows = ids.map((i) => {
    const total = ids.reduce((s, j) => s + metrics.confusion[i][j], 0) || 1;
    return el("tr", {}, [el("th", { scope: "row", textContent: names[i] }), ...ids.map((j) => {
      const cell = el("td", { textContent: metrics.confusion[i][j].toLocaleString() });
      const share = metrics.confusion[i][j] / total;
      cell.style.backgroundColor = `rgba(${i === j ? "40, 140, 60" : "200, 60, 40"}, ${(0.08 + 0.6 * share).toFixed(3)})`;
      cell.title = `${names[i]} predicted as ${names[j]}: ${percent(share)} of ${names[i]}`;
      return cell;
    })]);
  });
  $("confusion").replaceChildren(el("thead", {}, [head]), el("tbody", {}, rows));
}

wireInputs();
init();
