#!/bin/sh
# Entry point of the hfgan image: every HFGAN_<X>_FILE in the environment (a secret mounted as a file, e.g. the
# state URL with its Redis password) becomes HFGAN_<X> unless that is set already, then the command runs.
# Secrets stay out of compose.yaml and `docker inspect`. The `_FILE` variable is removed once read, so the library,
# which reads `_FILE` settings itself, never sees both.
set -eu
for name in $(env | sed -n 's/^\(HFGAN_[A-Z0-9_]*\)_FILE=.*/\1/p'); do
  eval "file=\${${name}_FILE}"
  eval "set_already=\${${name}+x}"
  if [ -z "$set_already" ]; then
    [ -r "$file" ] || { echo "hfgan-entrypoint: ${name}_FILE: cannot read $file" >&2; exit 2; }
    value=$(cat "$file")
    export "$name=$value"
  fi
  unset "${name}_FILE"
done
exec "$@"
