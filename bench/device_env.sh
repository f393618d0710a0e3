# Sourced by the serving scripts (bench/serve_ab.sh, bench/serve_overload.sh): on the GPU machine
# (a carried .deb/ folder and no wrk installed), install the carried wheels into /tmp/site and
# unpack wrk; elsewhere (wrk on PATH, even beside a .deb/ made for the next call), use that wrk.
# Sets $wrk; exits the script when the wheels cannot be installed.
wrk=$(command -v wrk)
if [ -d .deb ] && [ -z "$wrk" ]; then  # the GPU machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  mkdir -p /tmp/wrk && for f in .deb/*.deb; do dpkg -x "$f" /tmp/wrk; done
  export LD_LIBRARY_PATH=/tmp/wrk/usr/lib/x86_64-linux-gnu PATH=/tmp/site/bin:$PATH
  wrk=/tmp/wrk/usr/bin/wrk
fi
