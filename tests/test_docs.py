"""The README stays true: its commands exist, CI runs its test command."""
import os

import click

import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding='utf-8') as handle:
        return handle.read()


def command_paths(group, prefix=()):
    for name, command in group.commands.items():
        path = prefix + (name,)
        if isinstance(command, click.Group) and command.commands:
            yield from command_paths(command, path)
        if not isinstance(command, click.Group) or command.invoke_without_command:
            yield ' '.join(path)


def test_every_command_is_in_the_readme_reference():
    readme = read('README.md')
    missing = [path for path in command_paths(cli.main) if '`%s' % path not in readme]
    assert missing == []


def test_ci_runs_the_readme_test_command():
    command = [line.strip() for line in read('.ci/run').splitlines() if 'pytest' in line]
    assert len(command) == 1 and '    %s\n' % command[0] in read('README.md')
