# Sourced by scripts/controlplane.sh and scripts/nodepkgs.sh: a private apt configuration, so packages
# are downloaded (never installed) without touching the machine's apt state.
# debian_sources FILE [deb-src]: writes the machine's own Debian mirrors (deb822 or one-line sources)
# to FILE as one-line `deb` entries, each followed by its `deb-src` twin when asked.
debian_sources() {
  local out=$1 src=${2:-}
  : >"$out"
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    case "$f" in
      *.sources)
        # deb822: pair each URIs line with the Suites and Components of its stanza.
        awk -v src="$src" 'BEGIN{RS=""} /Types:.*deb/ {
               u="";s="";c="";
               n=split($0, L, "\n");
               for(i=1;i<=n;i++){ if(L[i] ~ /^URIs:/){sub(/^URIs:[ ]*/,"",L[i]); u=L[i]}
                                  if(L[i] ~ /^Suites:/){sub(/^Suites:[ ]*/,"",L[i]); s=L[i]}
                                  if(L[i] ~ /^Components:/){sub(/^Components:[ ]*/,"",L[i]); c=L[i]} }
               if (u ~ /debian/) { m=split(s, S, " "); for(j=1;j<=m;j++){ print "deb " u " " S[j] " " c; if (src != "") print "deb-src " u " " S[j] " " c } }
             }' "$f" >>"$out" ;;
      *) grep -E '^deb .*debian' "$f" | grep -v 'cloud.google\|nodesource' | while read -r _ rest; do
           echo "deb $rest"; [[ -z "$src" ]] || echo "deb-src $rest"; done >>"$out" || true ;;
    esac
  done
  [[ -s "$out" ]]
}
