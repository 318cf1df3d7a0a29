// Progressive enhancement, the only script: a copy button beside every read-only field
// marked .copyable (the pull commands, a new token's secret). Without it the field is
// still there to select and copy by hand.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("input.copyable").forEach(function (field) {
    var button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "Copy";
    var label = document.querySelector('label[for="' + field.id + '"]');
    button.setAttribute("aria-label", "Copy " + (label ? label.textContent.trim() : "the text"));
    button.addEventListener("click", function () {
      var done = function () { button.textContent = "Copied"; };
      field.select();
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(done, function () {
          if (document.execCommand("copy")) { done(); }
        });
      } else if (document.execCommand("copy")) {
        done();
      }
    });
    field.insertAdjacentElement("afterend", button);
  });
});
