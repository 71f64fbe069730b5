//! The interactive line syntax of `wsrelay client` on `/ws`: one typed line in, one command out.
//!
//! Owns: `parse_line` (`@id text`, `#room text`, `/join ROOM`, `/leave ROOM`, `/help`, `//text`,
//! plain text), `resolve` (plain text goes to `--to` or `--room`), the room-name rule, and
//! `LineError` with the one-line message the user sees.
//! Does not: build JSON (`envelope.rs`), queue or send anything (`session.rs`), or apply to raw
//! URLs (`/echo`, `/r/ROOM`), where every line is sent as it was typed.
//!
//! SPEC §7 (the line client), §6 (room names).

use std::fmt;

/// SPEC §6: room names are 1 to 64 characters.
const MAX_ROOM_CHARS: usize = 64;

/// What one typed line asks for, before the `--to`/`--room` default is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    /// `@bob hi`: a direct message.
    Send { to: String, text: String },
    /// `#lobby hi`: a message to a room.
    Publish { room: String, text: String },
    /// `/join lobby`.
    Join(String),
    /// `/leave lobby`.
    Leave(String),
    /// `/help`.
    Help,
    /// Anything else (and `//text`, which sends `/text`): goes to `--to` or `--room`.
    Plain(String),
}

/// Where plain lines go: `--to ID`, `--room ROOM`, or nowhere (then they are an error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DefaultTarget {
    None,
    To(String),
    Room(String),
}

/// A typed line that cannot be sent; the message is printed and the client goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineError {
    /// `@` or `#` with no name after it.
    NoName(char),
    /// `@bob` or `#lobby` with nothing to send.
    NoText(String),
    /// `/join` or `/leave` without a room, or with more than one word.
    Usage(&'static str),
    /// A room name outside SPEC §6's rule.
    BadRoom(String),
    /// `/something` we do not know.
    UnknownCommand(String),
    /// A plain line with neither `--to` nor `--room` given.
    NoRecipient,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineError::NoName('@') => f.write_str("`@` needs an id: @bob hello"),
            LineError::NoName(_) => f.write_str("`#` needs a room: #lobby hello"),
            LineError::NoText(to) => write!(f, "nothing to send to {to}"),
            LineError::Usage(usage) => write!(f, "usage: {usage}"),
            LineError::BadRoom(room) => write!(
                f,
                "{room:?} is not a room name (1-64 characters of A-Z a-z 0-9 . _ -)"
            ),
            LineError::UnknownCommand(cmd) => {
                write!(f, "unknown command /{cmd} (type /help)")
            }
            LineError::NoRecipient => f.write_str(
                "no recipient: start the line with @id or #room, or pass --to ID or --room ROOM",
            ),
        }
    }
}

impl std::error::Error for LineError {}

/// The text `/help` prints.
pub const HELP: &str = "\
@ID TEXT      send TEXT to ID
#ROOM TEXT    send TEXT to everyone in ROOM
/join ROOM    join ROOM (its messages and presence are printed)
/leave ROOM   leave ROOM
//TEXT        send /TEXT as plain text
TEXT          send to --to ID or --room ROOM
Ctrl-D        wait for outstanding acks, then quit";

/// Parses one line (without its line ending). Returns `Ok(None)` for a blank line.
///
/// # Errors
/// A `LineError` saying what is wrong with the line.
pub fn parse_line(line: &str) -> Result<Option<Line>, LineError> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    if let Some(rest) = line.strip_prefix('@') {
        let (to, text) = name_and_text(rest, '@')?;
        return Ok(Some(Line::Send { to, text }));
    }
    if let Some(rest) = line.strip_prefix('#') {
        let (room, text) = name_and_text(rest, '#')?;
        check_room(&room)?;
        return Ok(Some(Line::Publish { room, text }));
    }
    if let Some(escaped) = line.strip_prefix("//") {
        return Ok(Some(Line::Plain(format!("/{escaped}"))));
    }
    if let Some(command) = line.strip_prefix('/') {
        let mut words = command.split_whitespace();
        let name = words.next().unwrap_or_default();
        let args: Vec<&str> = words.collect();
        return match (name, args.as_slice()) {
            ("join", [room]) => check_room(room).map(|()| Some(Line::Join(room.to_string()))),
            ("join", _) => Err(LineError::Usage("/join ROOM")),
            ("leave", [room]) => check_room(room).map(|()| Some(Line::Leave(room.to_string()))),
            ("leave", _) => Err(LineError::Usage("/leave ROOM")),
            ("help", _) => Ok(Some(Line::Help)),
            (other, _) => Err(LineError::UnknownCommand(other.to_string())),
        };
    }
    Ok(Some(Line::Plain(line.to_string())))
}

/// Turns a plain line into a send or publish by the default target; other lines are unchanged.
///
/// # Errors
/// `NoRecipient` for a plain line when there is no default target.
pub fn resolve(line: Line, default: &DefaultTarget) -> Result<Line, LineError> {
    match (line, default) {
        (Line::Plain(_), DefaultTarget::None) => Err(LineError::NoRecipient),
        (Line::Plain(text), DefaultTarget::To(to)) => Ok(Line::Send {
            to: to.clone(),
            text,
        }),
        (Line::Plain(text), DefaultTarget::Room(room)) => Ok(Line::Publish {
            room: room.clone(),
            text,
        }),
        (other, _) => Ok(other),
    }
}

/// SPEC §6: a room name is 1-64 characters of `[A-Za-z0-9._-]`. Checked here so a typo gets an
/// answer at once instead of an error envelope later.
///
/// # Errors
/// `BadRoom` naming the room.
pub fn check_room(room: &str) -> Result<(), LineError> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !room.is_empty() && room.len() <= MAX_ROOM_CHARS && room.chars().all(valid_char) {
        Ok(())
    } else {
        Err(LineError::BadRoom(room.to_string()))
    }
}

/// Splits `bob hello there` into (`bob`, `hello there`): the name ends at the first space, and
/// the text keeps its inner spacing.
fn name_and_text(rest: &str, sigil: char) -> Result<(String, String), LineError> {
    let (name, text) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if name.is_empty() {
        return Err(LineError::NoName(sigil));
    }
    let text = text.trim_start();
    if text.is_empty() {
        return Err(LineError::NoText(format!("{sigil}{name}")));
    }
    Ok((name.to_string(), text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(to: &str, text: &str) -> Line {
        Line::Send {
            to: to.into(),
            text: text.into(),
        }
    }

    fn publish(room: &str, text: &str) -> Line {
        Line::Publish {
            room: room.into(),
            text: text.into(),
        }
    }

    fn check(input: &str, expected: Result<Option<Line>, LineError>) {
        assert_eq!(parse_line(input), expected, "{input:?}");
    }

    #[test]
    fn lines() {
        use LineError::*;
        let long_room = format!("#{} hi", "r".repeat(65));
        #[rustfmt::skip]
        let cases: Vec<(&str, Result<Option<Line>, LineError>)> = vec![
            ("@bob hi", Ok(Some(send("bob", "hi")))),
            ("@bob   hi  there ", Ok(Some(send("bob", "hi  there ")))),
            ("@bob\thi", Ok(Some(send("bob", "hi")))),
            ("@bob", Err(NoText("@bob".into()))),
            ("@bob   ", Err(NoText("@bob".into()))),
            ("@ hi", Err(NoName('@'))),
            ("#lobby hello all", Ok(Some(publish("lobby", "hello all")))),
            ("#a.b_c-1 x", Ok(Some(publish("a.b_c-1", "x")))),
            ("#lobby", Err(NoText("#lobby".into()))),
            ("# hi", Err(NoName('#'))),
            ("#lob/by hi", Err(BadRoom("lob/by".into()))),
            ("/join lobby", Ok(Some(Line::Join("lobby".into())))),
            ("/join   lobby  ", Ok(Some(Line::Join("lobby".into())))),
            ("/join", Err(Usage("/join ROOM"))),
            ("/join a b", Err(Usage("/join ROOM"))),
            ("/join a!", Err(BadRoom("a!".into()))),
            ("/leave lobby", Ok(Some(Line::Leave("lobby".into())))),
            ("/leave", Err(Usage("/leave ROOM"))),
            ("/help", Ok(Some(Line::Help))),
            ("/quit", Err(UnknownCommand("quit".into()))),
            ("/", Err(UnknownCommand("".into()))),
            ("//join lobby", Ok(Some(Line::Plain("/join lobby".into())))),
            ("hello", Ok(Some(Line::Plain("hello".into())))),
            ("  spaced  ", Ok(Some(Line::Plain("  spaced  ".into())))),
            ("bob@example.org #1", Ok(Some(Line::Plain("bob@example.org #1".into())))),
            ("", Ok(None)),
            ("   ", Ok(None)),
            (&long_room, Err(BadRoom("r".repeat(65)))),
        ];
        for (input, expected) in cases {
            check(input, expected);
        }
    }

    #[test]
    fn rooms() {
        let cases: &[(&str, bool)] = &[
            ("lobby", true),
            ("A.z_0-9", true),
            (&"r".repeat(64), true),
            (&"r".repeat(65), false),
            ("", false),
            ("a b", false),
            ("café", false),
        ];
        for &(room, ok) in cases {
            assert_eq!(check_room(room).is_ok(), ok, "{room:?}");
        }
    }

    #[test]
    fn defaults() {
        let plain = || Line::Plain("hi".into());
        let to = DefaultTarget::To("bob".into());
        let room = DefaultTarget::Room("lobby".into());
        let cases: Vec<(&str, Line, &DefaultTarget, Result<Line, LineError>)> = vec![
            ("to", plain(), &to, Ok(send("bob", "hi"))),
            ("room", plain(), &room, Ok(publish("lobby", "hi"))),
            (
                "none",
                plain(),
                &DefaultTarget::None,
                Err(LineError::NoRecipient),
            ),
            (
                "explicit wins",
                send("carol", "x"),
                &room,
                Ok(send("carol", "x")),
            ),
            (
                "join untouched",
                Line::Join("a".into()),
                &DefaultTarget::None,
                Ok(Line::Join("a".into())),
            ),
        ];
        for (name, line, default, expected) in cases {
            assert_eq!(resolve(line, default), expected, "{name}");
        }
    }
}
