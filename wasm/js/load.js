// Loads the wasm module once, in a browser (fetching the .wasm next to the glue) or in Node
// (reading it from disk).
let loaded = null;

export function loadEngine() {
  loaded ??= (async () => {
    const glue = await import('../pkg/syncline_wasm.js');
    const url = new URL('../pkg/syncline_wasm_bg.wasm', import.meta.url);
    if (typeof process !== 'undefined' && process.versions?.node && url.protocol === 'file:') {
      const { readFile } = await import('node:fs/promises');
      await glue.default({ module_or_path: await readFile(url) });
    } else {
      await glue.default({ module_or_path: url });
    }
    return glue.Engine;
  })();
  return loaded;
}
