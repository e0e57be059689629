#!/usr/bin/env bash
# Benchmarks on a shared machine: move every other thread to CPU 0 (away) and give them back their
# saved affinities (back), so a bench can have CPU 1 to itself. Root only; not used by CI.
#   bash bench/pin_others.sh away; <bench with --server-cpus 1>; bash bench/pin_others.sh back
mode=$1; me=$$; save=/tmp/pin-saved.txt
if [ "$mode" = away ]; then
  : > "$save"
  for t in /proc/[0-9]*/task/[0-9]*; do
    tid=${t##*/}; [ "$tid" = "$me" ] && continue
    cur=$(taskset -pc "$tid" 2>/dev/null | sed 's/.*: //') || continue
    [ -n "$cur" ] && echo "$tid $cur" >> "$save" && taskset -pc 0 "$tid" >/dev/null 2>&1
  done
  echo "moved $(wc -l < "$save") threads to CPU 0"
else
  while read -r tid cur; do taskset -pc "$cur" "$tid" >/dev/null 2>&1; done < "$save"
  # threads born while pinned inherited CPU 0: give them all CPUs back
  for t in /proc/[0-9]*/task/[0-9]*; do
    tid=${t##*/}; grep -q "^$tid " "$save" || taskset -pc 0-$(( $(nproc --all) - 1 )) "$tid" >/dev/null 2>&1
  done
  echo restored
fi
