//! The commands a user types into a headless client (`/join Lobby`), parsed.

use crate::protocol::{JoinRequest, Resolution};

/// Uses and lifetime of an invite when `/invite` names none.
pub const DEFAULT_INVITE_USES: u32 = 1;
pub const DEFAULT_INVITE_TTL_SECS: u32 = 24 * 3600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Join(JoinRequest),
    Leave,
    Create {
        name: String,
        description: String,
        password: Option<String>,
        user_limit: u32,
    },
    Invite {
        max_uses: u32,
        ttl_secs: u32,
    },
    /// Re-list the channels and who is in them.
    Channels,
    /// Send `count` probe datagrams to the current channel.
    Probe {
        count: u32,
    },
    /// A line of chat for the current channel.
    Say(String),
    /// A channel message typed in `channel`'s pane (the desktop app): sent only while we
    /// are in that channel, never into another.
    SayIn {
        channel: String,
        text: String,
    },
    /// A direct message.
    Msg {
        to: String,
        text: String,
    },
    /// Show the safety number shared with a user.
    Safety(String),
    /// Accept a user's identity after comparing safety numbers.
    Verify(String),
    /// Stop (or resume) sending voice.
    Mute(bool),
    /// Stop (or resume) playing voice.
    Deafen(bool),
    /// Hold (or release) push-to-talk.
    Talk(bool),
    /// A user's volume in percent (0-200), 0 muting them locally.
    Volume {
        user: String,
        percent: u32,
    },
    /// Mute (or unmute) a user for us alone.
    LocalMute {
        user: String,
        muted: bool,
    },
    /// When the microphone is on the air, noise suppression and echo cancellation.
    VoiceSettings {
        mode: crate::audio::dsp::VoiceMode,
        threshold_dbfs: i16,
        denoise: bool,
        echo_cancel: bool,
    },
    /// Which of the app's sounds (someone joined, left, a direct message) to play.
    Cues(crate::audio::cues::CueSettings),
    /// Moderation (admins only): end a user's session; end it and ban their address for
    /// `minutes`; remove a temporary channel; move a user to a channel.
    Kick(String),
    Ban {
        user: String,
        minutes: u32,
    },
    Close(String),
    /// Start (or stop) receiving a user's screen share.
    Watch {
        user: String,
        watch: bool,
    },
    Move {
        user: String,
        channel: String,
    },
    /// Start sharing a screen (or change what is shared), or stop (`None`).
    Share(Option<ShareRequest>),
    Quit,
}

/// What to share and how well, at most: the adapter goes lower when it must.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRequest {
    /// A monitor's name or number, `window:TITLE` or a `.y4m` file; `None`: the primary
    /// monitor.
    pub source: Option<String>,
    pub resolution: Resolution,
    /// 1-30.
    pub fps: u32,
    /// Share what the other applications play too (desktop audio).
    pub audio: bool,
}

impl ShareRequest {
    /// What a share starts at when nothing is said: 720p at 30 fps.
    pub const DEFAULT_RESOLUTION: Resolution = Resolution::P720;
    pub const DEFAULT_FPS: u32 = 30;
    pub const MAX_FPS: u32 = 30;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error(
        "unknown command /{0}; try /join, /leave, /create, /invite, /msg, /safety, /verify, /channels, /mute, /deafen, /talk, /volume, /probe, /watch, /unwatch, /share, /unshare, /kick, /ban, /close, /move or /quit"
    )]
    Unknown(String),
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("unterminated quote")]
    Quote,
}

const JOIN_USAGE: &str = "/join NAME [PASSWORD] [--invite TOKEN]";
const CREATE_USAGE: &str = "/create NAME [--description TEXT] [--password PW] [--limit N]";
const INVITE_USAGE: &str = "/invite [USES] [SECONDS]";
const PROBE_USAGE: &str = "/probe [COUNT]";
const MSG_USAGE: &str = "/msg NAME TEXT";
const SAFETY_USAGE: &str = "/safety NAME";
const KICK_USAGE: &str = "/kick NAME";
const WATCH_USAGE: &str = "/watch NAME, /unwatch NAME";
const SHARE_USAGE: &str = "/share [SOURCE] [--resolution 480p|720p|1080p] [--fps 1-30] [--audio], /unshare";
const BAN_USAGE: &str = "/ban NAME [MINUTES]";
const CLOSE_USAGE: &str = "/close CHANNEL";
const MOVE_USAGE: &str = "/move NAME CHANNEL";
/// A ban without a length lasts an hour.
const DEFAULT_BAN_MINUTES: u32 = 60;
const VERIFY_USAGE: &str = "/verify NAME";
const VOLUME_USAGE: &str = "/volume NAME PERCENT (0-200)";
const TALK_USAGE: &str = "/talk on|off";

fn one_name(args: &[String], usage: &'static str) -> Result<String, ParseError> {
    match args {
        [name] => Ok(name.clone()),
        _ => Err(ParseError::Usage(usage)),
    }
}

/// Parses one typed line. Lines that do not start with `/` are chat; blank lines are nothing.
pub fn parse_line(line: &str) -> Result<Option<Command>, ParseError> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    let Some(rest) = line.strip_prefix('/') else {
        return Ok(Some(Command::Say(line.to_owned())));
    };
    let words = split_words(rest)?;
    let Some((verb, args)) = words.split_first() else {
        return Err(ParseError::Unknown(String::new()));
    };
    let command = match verb.as_str() {
        "join" => parse_join(args)?,
        "leave" if args.is_empty() => Command::Leave,
        "leave" => return Err(ParseError::Usage("/leave")),
        "create" => parse_create(args)?,
        "invite" => {
            let max_uses = number_at(args, 0, INVITE_USAGE)?.unwrap_or(DEFAULT_INVITE_USES);
            let ttl_secs = number_at(args, 1, INVITE_USAGE)?.unwrap_or(DEFAULT_INVITE_TTL_SECS);
            if args.len() > 2 {
                return Err(ParseError::Usage(INVITE_USAGE));
            }
            Command::Invite { max_uses, ttl_secs }
        }
        "channels" => Command::Channels,
        "probe" => {
            if args.len() > 1 {
                return Err(ParseError::Usage(PROBE_USAGE));
            }
            Command::Probe { count: number_at(args, 0, PROBE_USAGE)?.unwrap_or(1) }
        }
        "quit" | "exit" => Command::Quit,
        "msg" => {
            // The text is the rest of the line as typed, spaces and quotes included.
            let (to, text) = rest
                .trim_start()
                .strip_prefix("msg")
                .map(str::trim_start)
                .and_then(|r| r.split_once(char::is_whitespace))
                .ok_or(ParseError::Usage(MSG_USAGE))?;
            let text = text.trim();
            if text.is_empty() {
                return Err(ParseError::Usage(MSG_USAGE));
            }
            Command::Msg { to: to.to_owned(), text: text.to_owned() }
        }
        "safety" => Command::Safety(one_name(args, SAFETY_USAGE)?),
        "verify" => Command::Verify(one_name(args, VERIFY_USAGE)?),
        "mute" | "unmute" | "deafen" | "undeafen" if !args.is_empty() => {
            return Err(ParseError::Usage("/mute, /unmute, /deafen, /undeafen"));
        }
        "mute" => Command::Mute(true),
        "unmute" => Command::Mute(false),
        "deafen" => Command::Deafen(true),
        "undeafen" => Command::Deafen(false),
        "talk" => match args {
            [on] if on == "on" => Command::Talk(true),
            [off] if off == "off" => Command::Talk(false),
            _ => return Err(ParseError::Usage(TALK_USAGE)),
        },
        "volume" => match args {
            [user, percent] => {
                let percent = percent.parse().ok().filter(|p| *p <= 200).ok_or(ParseError::Usage(VOLUME_USAGE))?;
                Command::Volume { user: user.clone(), percent }
            }
            _ => return Err(ParseError::Usage(VOLUME_USAGE)),
        },
        "kick" => Command::Kick(one_name(args, KICK_USAGE)?),
        "watch" => Command::Watch { user: one_name(args, WATCH_USAGE)?, watch: true },
        "unwatch" => Command::Watch { user: one_name(args, WATCH_USAGE)?, watch: false },
        "share" => parse_share(args)?,
        "unshare" if args.is_empty() => Command::Share(None),
        "unshare" => return Err(ParseError::Usage(SHARE_USAGE)),
        "ban" => {
            let minutes = number_at(args, 1, BAN_USAGE)?.unwrap_or(DEFAULT_BAN_MINUTES);
            match args {
                [user] | [user, _] => Command::Ban { user: user.clone(), minutes },
                _ => return Err(ParseError::Usage(BAN_USAGE)),
            }
        }
        "close" => Command::Close(one_name(args, CLOSE_USAGE)?),
        "move" => match args {
            [user, channel] => Command::Move { user: user.clone(), channel: channel.clone() },
            _ => return Err(ParseError::Usage(MOVE_USAGE)),
        },
        other => return Err(ParseError::Unknown(other.to_owned())),
    };
    Ok(Some(command))
}

fn parse_join(args: &[String]) -> Result<Command, ParseError> {
    let mut positional = Vec::new();
    let mut invite = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--invite" => invite = Some(args.next().ok_or(ParseError::Usage(JOIN_USAGE))?.clone()),
            _ => positional.push(arg.clone()),
        }
    }
    let mut positional = positional.into_iter();
    let channel = positional.next().ok_or(ParseError::Usage(JOIN_USAGE))?;
    let password = positional.next();
    if positional.next().is_some() {
        return Err(ParseError::Usage(JOIN_USAGE));
    }
    Ok(Command::Join(JoinRequest { channel, password, invite }))
}

fn parse_share(args: &[String]) -> Result<Command, ParseError> {
    let mut request = ShareRequest {
        source: None,
        resolution: ShareRequest::DEFAULT_RESOLUTION,
        fps: ShareRequest::DEFAULT_FPS,
        audio: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(ParseError::Usage(SHARE_USAGE));
        match arg.as_str() {
            "--resolution" => request.resolution = value()?.parse().map_err(|_| ParseError::Usage(SHARE_USAGE))?,
            "--fps" => {
                request.fps = value()?
                    .parse()
                    .ok()
                    .filter(|f| (1..=ShareRequest::MAX_FPS).contains(f))
                    .ok_or(ParseError::Usage(SHARE_USAGE))?;
            }
            "--audio" => request.audio = true,
            _ if request.source.is_none() && !arg.starts_with("--") => request.source = Some(arg.clone()),
            _ => return Err(ParseError::Usage(SHARE_USAGE)),
        }
    }
    Ok(Command::Share(Some(request)))
}

fn parse_create(args: &[String]) -> Result<Command, ParseError> {
    let mut name = None;
    let mut description = String::new();
    let mut password = None;
    let mut user_limit = 0;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().cloned().ok_or(ParseError::Usage(CREATE_USAGE));
        match arg.as_str() {
            "--description" => description = value()?,
            "--password" => password = Some(value()?),
            "--limit" => user_limit = value()?.parse().map_err(|_| ParseError::Usage(CREATE_USAGE))?,
            _ if name.is_none() && !arg.starts_with("--") => name = Some(arg.clone()),
            _ => return Err(ParseError::Usage(CREATE_USAGE)),
        }
    }
    let name = name.ok_or(ParseError::Usage(CREATE_USAGE))?;
    Ok(Command::Create { name, description, password, user_limit })
}

fn number_at(args: &[String], at: usize, usage: &'static str) -> Result<Option<u32>, ParseError> {
    args.get(at).map(|a| a.parse().map_err(|_| ParseError::Usage(usage))).transpose()
}

/// Splits on white space; double quotes group words (`/join "Late Night" pw`).
fn split_words(text: &str) -> Result<Vec<String>, ParseError> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err(ParseError::Quote);
    }
    if in_word {
        words.push(current);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Command {
        parse_line(line).unwrap().unwrap()
    }

    #[test]
    fn commands_parse() {
        assert_eq!(parse("/join Lobby"), Command::Join(JoinRequest::named("Lobby")));
        assert_eq!(
            parse(r#"/join "Late Night" pw"#),
            Command::Join(JoinRequest { channel: "Late Night".into(), password: Some("pw".into()), invite: None })
        );
        assert_eq!(
            parse("/join Staff --invite abc"),
            Command::Join(JoinRequest { channel: "Staff".into(), password: None, invite: Some("abc".into()) })
        );
        assert_eq!(parse("/leave"), Command::Leave);
        assert_eq!(
            parse(r#"/create Raid --description "tonight 9pm" --password x --limit 5"#),
            Command::Create {
                name: "Raid".into(),
                description: "tonight 9pm".into(),
                password: Some("x".into()),
                user_limit: 5
            }
        );
        assert_eq!(parse("/invite"), Command::Invite { max_uses: 1, ttl_secs: 86400 });
        assert_eq!(parse("/invite 3 600"), Command::Invite { max_uses: 3, ttl_secs: 600 });
        assert_eq!(parse("/probe 20"), Command::Probe { count: 20 });
        assert_eq!(parse("/channels"), Command::Channels);
        assert_eq!(parse("/quit"), Command::Quit);
        assert_eq!(
            parse("/msg bob  hi there, \"bob\" "),
            Command::Msg { to: "bob".into(), text: "hi there, \"bob\"".into() }
        );
        assert_eq!(parse("/safety bob"), Command::Safety("bob".into()));
        assert_eq!(parse("/verify bob"), Command::Verify("bob".into()));
        assert_eq!(parse("/kick mallory"), Command::Kick("mallory".into()));
        assert_eq!(parse("/ban mallory"), Command::Ban { user: "mallory".into(), minutes: 60 });
        assert_eq!(parse("/ban mallory 5"), Command::Ban { user: "mallory".into(), minutes: 5 });
        assert_eq!(parse(r#"/close "Raid night""#), Command::Close("Raid night".into()));
        assert_eq!(parse("/move bob Staff"), Command::Move { user: "bob".into(), channel: "Staff".into() });
        assert_eq!(parse("/watch alice"), Command::Watch { user: "alice".into(), watch: true });
        assert_eq!(parse("/unwatch alice"), Command::Watch { user: "alice".into(), watch: false });
        assert_eq!(parse_line("/watch"), Err(ParseError::Usage(WATCH_USAGE)));
        assert_eq!(
            parse("/share"),
            Command::Share(Some(ShareRequest { source: None, resolution: Resolution::P720, fps: 30, audio: false }))
        );
        assert_eq!(
            parse(r#"/share "window:My Editor" --resolution 1080p --fps 15 --audio"#),
            Command::Share(Some(ShareRequest {
                source: Some("window:My Editor".into()),
                resolution: Resolution::P1080,
                fps: 15,
                audio: true,
            }))
        );
        assert_eq!(parse("/unshare"), Command::Share(None));
        for bad in ["/share --fps 0", "/share --fps 31", "/share --resolution 4k", "/share a b", "/unshare x"] {
            assert_eq!(parse_line(bad), Err(ParseError::Usage(SHARE_USAGE)), "{bad}");
        }
        assert_eq!(parse("  hello there "), Command::Say("hello there".into()));
        assert_eq!(parse_line("   "), Ok(None));
    }

    #[test]
    fn bad_commands_say_why() {
        assert_eq!(parse_line("/dance"), Err(ParseError::Unknown("dance".into())));
        assert_eq!(parse_line("/join"), Err(ParseError::Usage(JOIN_USAGE)));
        assert_eq!(parse_line("/join a b c"), Err(ParseError::Usage(JOIN_USAGE)));
        assert_eq!(parse_line("/create --limit x"), Err(ParseError::Usage(CREATE_USAGE)));
        assert_eq!(parse_line("/invite many"), Err(ParseError::Usage(INVITE_USAGE)));
        assert_eq!(parse_line(r#"/join "open"#), Err(ParseError::Quote));
        assert_eq!(parse_line("/"), Err(ParseError::Unknown(String::new())));
        assert_eq!(parse_line("/msg bob"), Err(ParseError::Usage(MSG_USAGE)));
        assert_eq!(parse_line("/safety"), Err(ParseError::Usage(SAFETY_USAGE)));
        assert_eq!(parse_line("/ban mallory soon"), Err(ParseError::Usage(BAN_USAGE)));
        assert_eq!(parse_line("/ban"), Err(ParseError::Usage(BAN_USAGE)));
        assert_eq!(parse_line("/move bob"), Err(ParseError::Usage(MOVE_USAGE)));
        assert_eq!(parse_line("/kick"), Err(ParseError::Usage(KICK_USAGE)));
    }
}
