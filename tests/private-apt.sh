# Sourced: private_apt DIR ARCHES SOURCE-LINE... sets APT_CONFIG to an APT
# configuration of our own in DIR (its sources, lists and cache there; the
# system's sources are left alone) and runs apt-get update when the lists
# it needs are missing or the sources changed. ARCHES is a comma-separated
# list of extra binary architectures ("" for none). The decision rests on
# the lists and the sources, not on the configuration file: an update that
# failed once is retried on the next run.
private_apt() {
    _dir=$1 _arches=$2
    shift 2
    mkdir -p "$_dir/lists/partial" "$_dir/cache/archives/partial"
    printf '%s\n' "$@" > "$_dir/sources.list.new"
    {
        echo "Dir::Etc::SourceList \"$_dir/sources.list\";"
        echo "Dir::Etc::SourceParts \"/nonexistent\";"
        echo "Dir::State::Lists \"$_dir/lists\";"
        echo "Dir::Cache \"$_dir/cache\";"
        if [ -n "$_arches" ]; then
            printf 'APT::Architectures { "%s"; ' "$(dpkg --print-architecture)"
            echo "$_arches" | tr ',' '\n' | sed 's/.*/"&";/' | tr '\n' ' '
            echo '};'
        fi
    } > "$_dir/apt.conf"
    export APT_CONFIG="$_dir/apt.conf"
    _lists=no
    for _l in "$_dir/lists/"*_Packages* "$_dir/lists/"*_Sources*; do
        [ -s "$_l" ] && _lists=yes
    done
    if [ $_lists = no ] || ! cmp -s "$_dir/sources.list.new" "$_dir/sources.list"; then
        mv "$_dir/sources.list.new" "$_dir/sources.list"
        # On failure the sources are dropped, so that the next run updates
        # again rather than trust lists of other sources.
        apt-get update -qq || { rm -f "$_dir/sources.list"; return 1; }
    else
        rm -f "$_dir/sources.list.new"
    fi
}
