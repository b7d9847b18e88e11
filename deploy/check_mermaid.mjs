// Parses every ```mermaid block of the given Markdown files with Mermaid's own parser (jsdom stands in for the
// browser). Exit 1 on any parse error. Called by deploy/validate.sh (step docs) with NODE_PATH at its npm tools.
import fs from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(process.env.MERMAID_TOOLS + "/");
const { JSDOM } = require("jsdom");
const dom = new JSDOM("<!doctype html><html><body></body></html>");
globalThis.window = dom.window;
globalThis.document = dom.window.document;
for (const k of ["DOMParser", "Element", "HTMLElement", "Node", "navigator"]) {
  if (!(k in globalThis)) globalThis[k] = dom.window[k];
}
const { default: mermaid } = await import(require.resolve("mermaid"));
mermaid.initialize({ startOnLoad: false });

let failed = 0;
let count = 0;
for (const file of process.argv.slice(2)) {
  const md = fs.readFileSync(file, "utf8");
  const blocks = [...md.matchAll(/```mermaid\n([\s\S]*?)```/g)].map((m) => m[1]);
  for (const [i, block] of blocks.entries()) {
    count++;
    try {
      const r = await mermaid.parse(block);
      console.log(`${file} mermaid #${i + 1}: ${r.diagramType} ok`);
    } catch (e) {
      failed++;
      console.log(`${file} mermaid #${i + 1}: ${e.message}`);
    }
  }
}
console.log(`mermaid: ${count} diagrams, ${failed} failed`);
process.exit(failed ? 1 : 0);
