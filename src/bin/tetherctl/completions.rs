//! `tetherctl completions bash`: a bash completion script, made from the same tables as the
//! help, so it offers exactly the commands and options tetherctl takes. Device ids and ops are
//! asked of the broker as the user types, with the connection options typed so far.

use crate::help::{COMMANDS, COMMON_OPTIONS, FILE_OPTIONS, VALUE_OPTIONS};

const TEMPLATE: &str = r#"# bash completion for tetherctl (made by: tetherctl completions bash)
_tetherctl() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    # The words before the cursor, split at blanks only: COMP_WORDS also splits URLs at ':'.
    local line=${COMP_LINE:0:COMP_POINT}
    local -a words
    read -ra words <<< "$line"
    [[ $line =~ [[:space:]]$ ]] || unset 'words[${#words[@]}-1]'
    local command= word i
    local -a operands=() connection=()
    for ((i = 1; i < ${#words[@]}; i++)); do
        word=${words[i]}
        case $word in
            --json) [[ $command == cmd ]] && ((i++)) ;;
            --timeout | --confirm-s) ((i++)) ;;
            @VALUED@) connection+=("$word" "${words[i+1]}"); ((i++)) ;;
            --json=* | --timeout=*) ;;
            --*=*) connection+=("$word") ;;
            -*) ;;
            *) if [[ -z $command ]]; then command=$word; else operands+=("$word"); fi ;;
        esac
    done
    local prev=${words[${#words[@]}-1]}
    case $prev in
        @FILES@) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        @VALUES@ | --timeout | --confirm-s) COMPREPLY=(); return ;;
        --json) [[ $command == cmd ]] && { COMPREPLY=(); return; } ;;
    esac
    if [[ $cur == -* ]]; then
        local options=
        case $command in
@OPTIONS_OF@
        esac
        COMPREPLY=($(compgen -W "@COMMON@ $options" -- "$cur"))
        return
    fi
    local ask=("${words[0]}" "${connection[@]}" --connect-timeout 3)
    case $command:${#operands[@]} in
        :0 | help:0) COMPREPLY=($(compgen -W "@COMMANDS@" -- "$cur")) ;;
        completions:0) COMPREPLY=($(compgen -W "bash" -- "$cur")) ;;
        known-devices:0) COMPREPLY=($(compgen -W "forget" -- "$cur")) ;;
        watch:0 | ops:0 | cmd:0 | cmds:0 | firewall:0)
            COMPREPLY=($(compgen -W "$("${ask[@]}" devices 2>/dev/null | tail -n +2 | cut -d ' ' -f 1)" -- "$cur")) ;;
        cmd:1) COMPREPLY=($(compgen -W "$("${ask[@]}" ops "${operands[0]}" 2>/dev/null)" -- "$cur")) ;;
        firewall:1) COMPREPLY=($(compgen -W "show apply revert confirm" -- "$cur")) ;;
        firewall:2) [[ ${operands[1]} == apply ]] && COMPREPLY=($(compgen -f -- "$cur")) ;;
    esac
}
complete -F _tetherctl tetherctl"#;

pub fn bash() -> String {
    let options_of: Vec<String> = COMMANDS
        .iter()
        .filter(|c| !c.options.is_empty())
        .map(|c| format!("            {}) options=\"{}\" ;;", c.name, c.options.join(" ")))
        .collect();
    let commands: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
    let valued: Vec<&str> = FILE_OPTIONS.iter().chain(VALUE_OPTIONS).copied().collect();
    TEMPLATE
        .replace("@VALUED@", &valued.join(" | "))
        .replace("@FILES@", &FILE_OPTIONS.join(" | "))
        .replace("@VALUES@", &VALUE_OPTIONS.join(" | "))
        .replace("@OPTIONS_OF@", &options_of.join("\n"))
        .replace("@COMMON@", &COMMON_OPTIONS.join(" "))
        .replace("@COMMANDS@", &commands.join(" "))
}
