from setuptools import setup

setup(
    name='xhs-server',
    version='1.0.0',
    description='The server and command line that run a studio\'s fleet of Xiaohongshu phones on its LAN',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    py_modules=['xhs_server', 'models', 'cli', 'monitor', 'simulate'],
    install_requires=[
        'bottle>=0.13,<0.14',
        'peewee>=4.5.2,<5',
        'click>=8.1,<9',
        'cheroot>=10,<12',
        'pybase64>=1.3,<2',
    ],
    extras_require={
        'test': ['pytest>=8', 'webtest>=3', 'hypothesis>=6.100'],
    },
    entry_points={'console_scripts': ['xhs-server=cli:main']},
)
