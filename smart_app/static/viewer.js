// Study viewer: draws the rendered film on a canvas with zoom, pan and display presets.
// Served by the app itself (strict CSP: no inline script, no CDN).
(function () {
  "use strict";
  var canvas = document.getElementById("film");
  if (!canvas) { return; }
  var status = document.getElementById("image-status");
  var preset = document.getElementById("window-preset");
  var ctx = canvas.getContext("2d");
  var image = new Image();
  var original = null; // ImageData of the film at native size, for the presets
  var work = document.createElement("canvas");
  var view = { zoom: 1, x: 0, y: 0 };
  // Display presets as (low, high) of the 8-bit rendered image mapped to black..white.
  var PRESETS = {
    default: [0, 255, false],
    lung: [0, 190, false],
    mediastinum: [60, 200, false],
    bone: [110, 255, false],
    invert: [0, 255, true]
  };

  function applyPreset() {
    if (!original) { return; }
    var p = PRESETS[preset.value] || PRESETS.default;
    var low = p[0], high = p[1], invert = p[2];
    var out = new ImageData(original.width, original.height);
    var src = original.data, dst = out.data, scale = 255 / Math.max(1, high - low);
    for (var i = 0; i < src.length; i += 4) {
      var v = Math.min(255, Math.max(0, (src[i] - low) * scale));
      if (invert) { v = 255 - v; }
      dst[i] = dst[i + 1] = dst[i + 2] = v;
      dst[i + 3] = 255;
    }
    work.getContext("2d").putImageData(out, 0, 0);
    draw();
  }

  function fitScale() {
    return Math.min(canvas.width / work.width, canvas.height / work.height);
  }

  function draw() {
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!original) { return; }
    var s = fitScale() * view.zoom;
    var w = work.width * s, h = work.height * s;
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(work, (canvas.width - w) / 2 + view.x, (canvas.height - h) / 2 + view.y, w, h);
  }

  function zoom(factor) {
    view.zoom = Math.min(16, Math.max(0.25, view.zoom * factor));
    draw();
  }

  function reset() {
    view = { zoom: 1, x: 0, y: 0 };
    preset.value = "default";
    applyPreset();
  }

  image.onload = function () {
    work.width = image.naturalWidth;
    work.height = image.naturalHeight;
    var wctx = work.getContext("2d");
    wctx.drawImage(image, 0, 0);
    original = wctx.getImageData(0, 0, work.width, work.height);
    canvas.dataset.loaded = "true";
    status.textContent = "Image " + work.width + " \u00d7 " + work.height + " pixels.";
    applyPreset();
  };
  image.onerror = function () {
    canvas.dataset.loaded = "error";
    status.textContent = "The image could not be shown (the EHR did not provide a readable DICOM).";
  };
  image.src = canvas.dataset.src;

  document.getElementById("zoom-in").addEventListener("click", function () { zoom(1.25); });
  document.getElementById("zoom-out").addEventListener("click", function () { zoom(0.8); });
  document.getElementById("reset").addEventListener("click", reset);
  preset.addEventListener("change", applyPreset);

  var drag = null;
  canvas.addEventListener("pointerdown", function (e) {
    drag = { x: e.clientX - view.x, y: e.clientY - view.y };
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", function (e) {
    if (!drag) { return; }
    view.x = e.clientX - drag.x;
    view.y = e.clientY - drag.y;
    draw();
  });
  canvas.addEventListener("pointerup", function () { drag = null; });
  canvas.addEventListener("wheel", function (e) {
    e.preventDefault();
    zoom(e.deltaY < 0 ? 1.1 : 0.9);
  }, { passive: false });
  canvas.addEventListener("keydown", function (e) {
    var step = 40, handled = true;
    if (e.key === "ArrowLeft") { view.x += step; }
    else if (e.key === "ArrowRight") { view.x -= step; }
    else if (e.key === "ArrowUp") { view.y += step; }
    else if (e.key === "ArrowDown") { view.y -= step; }
    else if (e.key === "+" || e.key === "=") { view.zoom = Math.min(16, view.zoom * 1.25); }
    else if (e.key === "-") { view.zoom = Math.max(0.25, view.zoom * 0.8); }
    else if (e.key === "0") { view = { zoom: 1, x: 0, y: 0 }; }
    else { handled = false; }
    if (handled) { e.preventDefault(); draw(); }
  });
}());
